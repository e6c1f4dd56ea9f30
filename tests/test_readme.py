"""Every example of README.md runs as written (issue 22).

Every fenced block of README.md that holds commands (```bash, ```sh, ```shell, ```console, ```python,
and an unlabelled block whose first line starts with a command) is either RUN here or SKIPPED with
a reason; each list names its blocks by a distinctive substring. A block in neither list fails, so
a new example is never silently left out, and an entry that matches no block fails, so the lists
never go stale. Blocks of data (```yaml, the layout tree) are not examples to run.

A RUN block runs with `bash -e -o pipefail` (a Python block with the venv's python) in a fresh
temporary folder that links to every top-level entry of the repository, so its relative paths
(`.venv/bin/genserve`, `app/static/samples/...`) resolve as from the repository root while its
outputs (`out/`) stay out of the repository. It runs against `python -m app` serving the shipped
weights, on port 8000 as the README says when that port is free, else on a free port that
replaces `:8000` in the block's text. Every output the block names (`-o FILE`, `--out-dir DIR`,
`> FILE`, Python's `.save("FILE")`) must exist, inside the temporary folder, and be a valid PNG or
JSON. A SKIP block is still checked as far as it can be without its cluster, GPU or hours: bash
parses it, its `make` targets exist, its `python -m training` commands parse and the repository
files it names exist.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.app.test_drain import free_port

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
VENV_BIN = REPO / ".venv" / "bin"
README_PORT = 8000  # what the README's examples say: localhost:8000, 127.0.0.1:8000, the CLI's default
START_TIMEOUT_S = 120.0  # imports torch and loads 15 weight files (about 3 s idle; slower on a busy 2-core machine)
BLOCK_TIMEOUT_S = 120.0

# a distinctive substring of the block -> what running it shows
RUN = {
    "curl -fsS localhost:8000/models": "the API with curl: every endpoint of the table, on the bundled images",
    ".venv/bin/genserve sample --model vae": "the command line client (.venv/bin/genserve)",
    "from app.client import APIError, Client": "the Python client",
}

# a distinctive substring of the block -> why it is not run here
SKIP = {
    "make serve   #": "starts the server itself (make serve) and runs until Ctrl+C; make test runs the whole "
                     "suite, this file included",
    "apt-get install dataset-fashion-mnist": "trains for hours on a CPU and needs Fashion-MNIST "
                                             "(apt-get install dataset-fashion-mnist)",
    "--mean-mse-weight 10 --epochs 7": "trains for hours on a CPU and needs the CIFAR-10 JPEG folder in data/cifar10",
    "docker compose up --build": "needs Docker with the NVIDIA runtime, and builds a 6 GB image (minutes)",
    "docker/compose.cpu.yml": "needs Docker, builds a 6 GB image (minutes) and serves on port 8000 in the "
                              "foreground; tests/deploy/test_docker.py checks the image",
    "bash benchmarks/gpu/check.sh": "needs a GPU (and wheels.sh the network); .ci/run runs the check's CPU dry run",
    "kubectl apply -k": "needs a Kubernetes cluster; tests/deploy/test_k8s.py renders every overlay",
    "serve run deploy/ray/serve.yaml": "starts a local Ray cluster in the foreground until Ctrl+C and takes minutes; "
                                       "tests/deploy/test_ray_serve.py (slow) runs the same app on Ray",
}

COMMAND_LANGUAGES = {"bash", "sh", "shell", "console", "python", "py"}
DATA_LANGUAGES = {"yaml", "yml", "text", "json", "toml", "ini"}  # shown, not run
# first words of an unlabelled block that make it commands (besides anything on PATH)
KNOWN_COMMANDS = {"make", "curl", "docker", "kubectl", "serve", "genserve", "python", "python3", "bash", "pip",
                  "git", "export", "cd", "source", "torchrun"}
PROJECT_DIRS = ("app", "benchmarks", "deploy", "docker", "models", "tests", "training", "weights")
OUTPUT_FLAGS = ("-o", "--output", "--out", "--out-dir", "--run-dir")


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    language: str  # "bash", "python", ... ("" unlabelled)
    text: str

    @property
    def is_python(self) -> bool:
        return self.language in ("python", "py")

    def __str__(self) -> str:
        first = self.text.strip().splitlines()[0] if self.text.strip() else ""
        return f"README.md line {self.line} ({self.language or 'unlabelled'}): {first[:80]!r}"


def _is_command_line(line: str) -> bool:
    line = line.strip().removeprefix("$ ")
    words = [w for w in line.split() if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", w)]  # VAR=value prefixes
    if not words:
        return False
    word = words[0]
    return word in KNOWN_COMMANDS or word.startswith(("./", ".venv/")) or shutil.which(word) is not None


FENCE = re.compile(r"(\s*)(`{3,}|~{3,})\s*([\w+-]*)\s*")  # CommonMark: indented or not, ``` or ~~~, 3 or more


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of `text` that hold commands. Any fence counts (indented in a list, ~~~, four
    backticks); a block in a language that is neither commands nor known data fails, so that no example
    can hide from this test in an unusual fence."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.fullmatch(lines[i])
        if not m:
            i += 1
            continue
        start, indent, fence, language = i, m.group(1), m.group(2), m.group(3).lower()
        assert language in COMMAND_LANGUAGES | DATA_LANGUAGES | {""}, (
            f"README.md line {start + 1}: a ```{language} block: add its language to COMMAND_LANGUAGES (run) "
            "or DATA_LANGUAGES (not commands)")
        i += 1
        body = []
        while i < len(lines) and not re.fullmatch(rf"\s*{fence[0]}{{{len(fence)},}}\s*", lines[i]):
            body.append(lines[i].removeprefix(indent))
            i += 1
        assert i < len(lines), f"README.md line {start + 1}: a fenced block that never closes"
        i += 1
        code = [ln for ln in body if ln.strip() and not ln.lstrip().startswith("#")]
        if language in COMMAND_LANGUAGES or (language == "" and code and _is_command_line(code[0])):
            if language == "console":  # keep the commands, not the output shown after them
                body = [ln.removeprefix("$ ") for ln in body if ln.startswith("$ ")]
            blocks.append(Block(start + 1, language, "\n".join(body) + "\n"))
    return blocks


def classify(blocks: list[Block]) -> tuple[dict[str, Block], dict[str, Block], list[str]]:
    """(RUN key -> block, SKIP key -> block, problems)."""
    found: dict[str, dict[str, Block]] = {"RUN": {}, "SKIP": {}}
    problems = []
    for name, table in (("RUN", RUN), ("SKIP", SKIP)):
        for key in table:
            matches = [b for b in blocks if key in b.text]
            if not matches:
                problems.append(f"{name} entry {key!r} matches no block of README.md: remove it or fix the substring")
            elif len(matches) > 1:
                problems.append(f"{name} entry {key!r} matches {len(matches)} blocks ({', '.join(map(str, matches))}): "
                                "use a more distinctive substring")
            else:
                found[name][key] = matches[0]
    for block in blocks:
        keys = [k for table in found.values() for k, b in table.items() if b == block]
        if not keys:
            problems.append(f"{block} is neither run nor skipped: add a distinctive substring of it to RUN in "
                            "tests/test_readme.py, or to SKIP with the reason it cannot run here")
        elif len(keys) > 1:
            problems.append(f"{block} is matched by several entries: {keys}")
    return found["RUN"], found["SKIP"], problems


BLOCKS = readme_blocks(README.read_text())
RUN_BLOCKS, SKIP_BLOCKS, PROBLEMS = classify(BLOCKS)


def test_every_block_is_run_or_skipped_with_a_reason() -> None:
    assert len(BLOCKS) >= len(RUN) + len(SKIP), [str(b) for b in BLOCKS]
    assert not PROBLEMS, "\n".join(PROBLEMS)
    assert all(reason.strip() for reason in SKIP.values())


def test_block_extraction_sees_what_the_lists_need() -> None:
    """The extraction itself: labelled and unlabelled command blocks are examples, data blocks are not."""
    text = ("```bash\nmake serve\n```\n\n```\napp/   the service\n```\n\n```\ncurl -fsS localhost:8000/models\n```\n\n"
            "```yaml\nspec: {}\n```\n\n```console\n$ make test\n766 passed\n```\n")
    blocks = readme_blocks(text)
    assert [(b.line, b.language, b.text) for b in blocks] == [
        (1, "bash", "make serve\n"), (9, "", "curl -fsS localhost:8000/models\n"), (17, "console", "make test\n")]


# --- the live service ------------------------------------------------------------------------------


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass
class Service:
    port: int
    logs: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _start(port: int, logs: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENSERVE_")}
    env.update({"GENSERVE_PORT": str(port), "GENSERVE_HOST": "127.0.0.1", "GENSERVE_WEIGHTS_DIR": str(REPO / "weights"),
                "GENSERVE_DEVICE": "cpu", "GENSERVE_CHECK_CACHE_DIR": "none", "GENSERVE_RELOAD_INTERVAL_S": "0",
                "GENSERVE_DRAIN_DELAY_S": "0", "GENSERVE_ACCESS_LOG": "false"})
    with open(logs, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "app"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group, so the kill reaches its children


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """`python -m app` on the shipped weights, on the README's port 8000 when it is free, ready."""
    if not (VENV_BIN / "genserve").exists():
        pytest.skip(f"no {VENV_BIN / 'genserve'}: the README's examples need `make install` (or `make serve`) first")
    logs = tmp_path_factory.mktemp("service") / "service.log"
    ports = ([README_PORT] if _port_is_free(README_PORT) else []) + [free_port()]
    for port in ports:
        proc = _start(port, logs)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    break
                assert time.monotonic() < deadline, f"not ready after {START_TIMEOUT_S} s:\n{logs.read_text()}"
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            if proc.poll() is None:
                yield Service(port, logs)
                return
            # exit code 3 with the port taken between the check and the bind: try a free port
            assert proc.returncode == 3 and port != ports[-1], (
                f"python -m app exited with {proc.returncode}:\n{logs.read_text()}")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- running a block ---------------------------------------------------------------------------------


@dataclass
class Ran:
    block: Block
    cwd: Path
    script: str
    returncode: int
    output: str


def _workdir(tmp: Path) -> Path:
    """A folder whose top-level entries link to the repository's, so relative paths resolve as from the root
    while whatever a block creates (out/) stays in the folder."""
    work = tmp / "repo"
    work.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in (".git", "out"):
            (work / entry.name).symlink_to(entry)
    return work


def _localise(text: str, port: int) -> str:
    """The block as it would run against the service on `port` (the same text when port is 8000)."""
    return re.sub(rf"(localhost|127\.0\.0\.1):{README_PORT}\b", rf"\g<1>:{port}", text)


@pytest.fixture(scope="module")
def ran(service: Service, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Ran]:
    """run(key): the RUN block of `key`, run once (on first demand) in a fresh folder."""
    cache: dict[str, Ran] = {}

    def run(key: str) -> Ran:
        if key not in cache:
            block = RUN_BLOCKS[key]
            work = _workdir(tmp_path_factory.mktemp("readme"))
            script = _localise(block.text, service.port)
            env = {k: v for k, v in os.environ.items() if not k.startswith("GENSERVE_")}
            if service.port != README_PORT:  # the CLI's default URL is the README's port
                env["GENSERVE_URL"] = service.url
            if block.is_python:  # from standard input, as pasted into the interpreter: sys.path starts with the folder
                argv, stdin = [str(VENV_BIN / "python"), "-"], script
            else:  # from a file beside the folder, so a command that reads standard input does not eat the script
                (work.parent / "block.sh").write_text(script)
                argv, stdin = ["bash", "-e", "-o", "pipefail", str(work.parent / "block.sh")], ""
            proc = subprocess.run(argv, check=False, input=stdin, cwd=work, env=env, capture_output=True, text=True,
                                  timeout=BLOCK_TIMEOUT_S)
            cache[key] = Ran(block, work, script, proc.returncode, proc.stdout + proc.stderr)
        return cache[key]

    return run


def outputs(block: Block, script: str) -> list[tuple[str, str]]:
    """(kind, path) of every output a block names: "file" for -o/--output/> FILE (Python: .save(FILE)),
    "dir" for --out-dir DIR."""
    found = []
    for line in script.splitlines():
        code = line.split(" #", 1)[0]
        if block.is_python:
            found += [("file", m) for m in re.findall(r"""\.save\(\s*["']([^"']+)["']""", code)]
            continue
        found += shell_outputs(line)
    return found


def shell_outputs(line: str) -> list[tuple[str, str]]:
    """The outputs one shell line names, read as the shell splits it (quotes, comments): -o F, --output F or
    --output=F, short flags ending in o (curl's -fsSo F), > F or >F, --out-dir D or --out-dir=D."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # a quote that a later line closes
        words = line.split(" #", 1)[0].split()
    found, following = [], None
    for word in words:
        if following is not None:
            found.append((following, word))
            following = None
        elif word in ("-o", "--output", "--out", ">") or re.fullmatch(r"-[A-Za-z]*o", word):
            following = "file"
        elif word == "--out-dir":
            following = "dir"
        elif m := re.fullmatch(r"(?:--output|--out)=(.+)|>(.+)", word):
            found.append(("file", m.group(1) or m.group(2)))
        elif m := re.fullmatch(r"--out-dir=(.+)", word):
            found.append(("dir", m.group(1)))
    found = [(kind, path.rstrip(";&|")) for kind, path in found]  # `a >f; b`: shlex keeps the ; on the word
    return [(kind, path) for kind, path in found if path]


def check_file(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0, f"{path} was not written"
    if path.suffix == ".png":
        with Image.open(path) as img:
            assert img.format == "PNG", path
            img.load()  # decodes every pixel: a truncated or corrupt file raises
    elif path.suffix == ".json":
        json.loads(path.read_text())


@pytest.mark.parametrize("key", list(RUN))
def test_readme_example_runs(key: str, ran) -> None:
    if key not in RUN_BLOCKS:
        pytest.fail("\n".join(PROBLEMS))
    result = ran(key)
    assert result.returncode == 0, f"{result.block} failed (exit {result.returncode}):\n{result.output[-4000:]}"
    named = outputs(result.block, result.script)
    assert named, f"{result.block} names no output to check"
    for kind, name in named:
        path = (result.cwd / name).resolve()
        assert path.is_relative_to(result.cwd.parent.resolve()), f"{result.block} writes {name} into the repository"
        if kind == "dir":
            files = sorted(path.glob("*.png"))
            assert files, f"{result.block}: no PNG in {name}"
            for f in files:
                check_file(f)
        else:
            check_file(path)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def test_cli_sample_gives_the_pixels_of_the_curl_above(ran) -> None:
    """The README says `genserve sample ... --temperature 0.8 -o out/grid.png` gives the curl's out/vae-samples.png."""
    curl, cli = ran("curl -fsS localhost:8000/models"), ran(".venv/bin/genserve sample --model vae")
    assert curl.returncode == 0 and cli.returncode == 0, curl.output[-2000:] + cli.output[-2000:]
    assert "out/vae-samples.png" in cli.block.text  # the comment that makes the claim names the file
    a, b = _pixels(curl.cwd / "out" / "vae-samples.png"), _pixels(cli.cwd / "out" / "grid.png")
    assert a.shape == b.shape and np.array_equal(a, b)


# --- what can be checked of a skipped block ----------------------------------------------------------


def _commands(text: str) -> list[list[str]]:
    """Each command of a bash block as words: continuations joined, comments dropped, split at && and ;."""
    joined = re.sub(r"\\\n", " ", text)
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        current: list[str] = []
        for w in words + ["&&"]:
            if w in ("&&", ";", "||"):
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(w)
    return commands


@pytest.mark.parametrize("key", list(SKIP))
def test_skipped_example_is_still_sound(key: str) -> None:
    if key not in SKIP_BLOCKS:
        pytest.fail("\n".join(PROBLEMS))
    block = SKIP_BLOCKS[key]
    syntax = subprocess.run(["bash", "-n"], check=False, input=block.text, capture_output=True, text=True)
    assert syntax.returncode == 0, f"{block}: {syntax.stderr}"
    for words in _commands(block.text):
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
            words = words[1:]  # VAR=value prefixes
        if words[:1] == ["make"] and shutil.which("make"):
            dry = subprocess.run(["make", "-n", *words[1:]], check=False, cwd=REPO, capture_output=True, text=True)
            assert dry.returncode == 0, f"{block}: `{shlex.join(words)}`: {dry.stderr}"
        if words[:3] == [".venv/bin/python", "-m", "training"]:
            from training.__main__ import build_parser

            try:
                build_parser().parse_args(words[3:])
            except SystemExit:
                pytest.fail(f"{block}: `{shlex.join(words)}` does not parse (see stderr)")
        for before, word in zip([""] + words, words):
            top = word.split("/", 1)[0]
            if "/" in word and top in PROJECT_DIRS and before not in OUTPUT_FLAGS:
                assert (REPO / word).exists(), f"{block} names {word}, which is not in the repository"


def test_the_extractor_finds_commands_in_every_kind_of_fence():
    text = "\n".join([
        "~~~bash", "echo tilde", "~~~",
        "- a list item:", "  ```bash", "  echo indented", "  ```",
        "````bash", "echo four", "```", "echo still inside", "````",
        "```", "curl -fsS localhost:8000/health", "```",
        "```yaml", "key: value", "```",
    ])
    blocks = readme_blocks(text)
    assert [b.text for b in blocks] == ["echo tilde\n", "echo indented\n", "echo four\n```\necho still inside\n",
                                        "curl -fsS localhost:8000/health\n"]
    with pytest.raises(AssertionError, match="zsh"):
        readme_blocks("```zsh\necho hidden\n```")


def test_outputs_are_read_as_the_shell_reads_them():
    assert shell_outputs("curl -fsS x -o out/a.png && curl -fsSo out/b.png y") == [("file", "out/a.png"), ("file", "out/b.png")]
    assert shell_outputs("genserve sample --output=out/c.png --out-dir 'out/d e'") == [("file", "out/c.png"), ("dir", "out/d e")]
    assert shell_outputs("curl x > out/e.json  # -o not/this.png") == [("file", "out/e.json")]
    assert shell_outputs("curl x >out/f.json; ls -la") == [("file", "out/f.json")]
