"""Per-call host overhead of each kernel front door (CPU, TRITON_INTERPRET=1), kernel launches stubbed out.

Run: ``python scripts/front_door_overhead.py`` (``MODE=no_grad`` for Token2Wav's grad mode; with
``PYTHONPATH=<another checkout>`` it times that one's omni_kernels).

Every @triton.jit kernel global of the op modules is replaced by a no-op, and indices_checkable() returns False
(the default CUDA path: no host-side value checks), so what is timed is: validation + backend resolution +
custom-op / direct call + the launcher's Python (allocations, strides, grid), without Triton's own launch.
"""
import importlib
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"
import torch  # noqa: E402

torch.set_num_threads(1)
from triton.runtime.jit import KernelInterface  # noqa: E402

import omni_kernels as ok  # noqa: E402
from omni_kernels import _checks  # noqa: E402

MODS = ["store_kv_cache", "apply_tmrope", "tmrope_store_kv", "paged_decode_attention", "paged_prefill_attention",
        "window_attention", "sliding_block_attention", "anti_aliased_snake"]


class _Noop:
    def __getitem__(self, grid):
        return lambda *a, **k: None


for name in MODS:
    m = importlib.import_module(f"omni_kernels.{name}")
    for attr, val in list(vars(m).items()):
        if isinstance(val, KernelInterface):
            setattr(m, attr, _Noop())
    if hasattr(m, "indices_checkable"):
        m.indices_checkable = lambda t: False
_checks.indices_checkable = lambda t: False
os.environ.pop("OMNI_BACKEND", None)


def t(f, n=3000):
    for _ in range(100):
        f()
    best = 1e9
    for _ in range(5):
        s = time.perf_counter()
        for _ in range(n):
            f()
        best = min(best, (time.perf_counter() - s) / n * 1e6)
    return best


T, HQ, HK, D, NB, P = 1, 4, 2, 16, 4, 4
q = torch.randn(T, HQ, D)
k = torch.randn(T, HK, D)
v = torch.randn(T, HK, D)
pos = torch.zeros(3, T, dtype=torch.int64)
kc = torch.zeros(NB, P, HK, D)
vc = torch.zeros(NB, P, HK, D)
slots = torch.zeros(T, dtype=torch.int64)
bt = torch.zeros(1, 2, dtype=torch.int32)
cl = torch.ones(1, dtype=torch.int32)
cu1 = torch.tensor([0, T], dtype=torch.int32)
qw = torch.randn(8, 2, 16)
cuw = torch.tensor([0, 4, 8], dtype=torch.int32)
x = torch.randn(1, 4, 8)
a = torch.zeros(4)
f = torch.zeros(12)
B = "triton"
calls = {
    "store_kv_cache": lambda: ok.store_kv_cache(k, v, kc, vc, slots, backend=B),
    "apply_tmrope": lambda: ok.apply_tmrope(q, k, pos, mrope_section=[2, 3, 3], rope_theta=1e6, backend=B),
    "tmrope_store_kv": lambda: ok.tmrope_store_kv(q, k, v, pos, kc, vc, slots, mrope_section=[2, 3, 3],
                                                  rope_theta=1e6, backend=B),
    "paged_decode_attention": lambda: ok.paged_decode_attention(q, kc, vc, bt, cl, backend=B),
    "paged_prefill_attention": lambda: ok.paged_prefill_attention(q, kc, vc, bt, cu1, cl, backend=B),
    "window_attention": lambda: ok.window_attention(qw, qw, qw, cuw, max_seqlen=4, backend=B),
    "sliding_block_attention": lambda: ok.sliding_block_attention(qw, qw, qw, block_size=4, look_back=1,
                                                                  look_ahead=0, backend=B),
    "anti_aliased_snake": lambda: ok.anti_aliased_snake(x, a, a, f, f, backend=B),
}
only = sys.argv[1:] or list(calls)
MODE = os.environ.get("MODE", "inference_mode")  # the engine runs under inference_mode, Token2Wav under no_grad
print("mode:", MODE)
with getattr(torch, MODE)():
    for name in only:
        print(f"{name:26s} front door, launch stubbed: {t(calls[name]):6.1f} us")
