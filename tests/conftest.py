import torch

# Tiny models on a 2-core machine: one thread avoids oversubscription when tests run beside other work.
torch.set_num_threads(1)
