# scratch (not to be committed): time the parts of one FLCE chunk on the GPU
import sys, importlib
sys.path.insert(0, "kernels"); sys.path.insert(0, ".")
import torch, triton
fl = importlib.import_module("corept_kernels.fused_linear_ce")
ce = importlib.import_module("corept_kernels.cross_entropy")
b = lambda f: triton.testing.do_bench(f, warmup=10, rep=50, return_mode="median")
N, H, V = 8192, 4096, 128256
for C in (2048, 4096):
    h = torch.randn(C, H, device="cuda", dtype=torch.bfloat16); w = torch.randn(V, H, device="cuda", dtype=torch.bfloat16) * 0.02
    y = torch.randint(0, V, (C,), device="cuda")
    lg = h @ w.t(); loss = torch.empty(C, device="cuda"); lse = torch.empty(C, device="cuda"); sc = torch.ones((), device="cuda")
    acc = torch.zeros(V, H, device="cuda"); gh = torch.empty(C, H, device="cuda", dtype=torch.bfloat16)
    parts = {
      "fwd gemm": lambda: torch.mm(h, w.t(), out=lg),
      "ce kernel (fwd+grad in place)": lambda: ce.launch_forward(lg, y, loss, lse, ignore_index=-100, softcap=None, label_smoothing=0.0, z_loss=0.0, grad_scale=sc, dx=lg),
      "grad_h gemm": lambda: torch.mm(lg, w, out=gh),
      "grad_w addmm out_dtype fp32 whole": lambda: torch.addmm(acc, lg.t(), h, out_dtype=torch.float32, out=acc),
      "grad_w sliced x8": lambda: [fl._addmm_fp32(a, lg[:, v0:v0 + a.shape[0]].t(), h) for v0, a in zip(range(0, V, 16032), acc.split(16032))],
      "grad_w bf16 mm (no acc)": lambda: torch.mm(lg.t(), h),
      "grad_w mm out_dtype fp32 beta0": lambda: torch.mm(lg.t(), h, out_dtype=torch.float32),
    }
    for k, f in parts.items():
        try:
            t = b(f); print(f"C={C} {k:40s} {t:7.3f} ms  {2*C*H*V/t/1e9:6.0f} TFLOP/s" , flush=True)
        except Exception as e:
            print(C, k, "ERR", e)
    del lg, acc
    torch.cuda.empty_cache()
x = torch.randn(V, H, device="cuda"); o = torch.empty(V, H, device="cuda", dtype=torch.bfloat16); g = torch.ones((), device="cuda")
print("final cast", b(lambda: torch.mul(x, g, out=o)))
