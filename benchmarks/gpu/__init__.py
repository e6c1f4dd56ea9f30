"""The GPU check (check.sh) and its two Python steps."""
