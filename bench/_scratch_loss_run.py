# scratch (not to be committed): run bench/kernels_loss.py cases through the harness's measure()
import sys, json
sys.path.insert(0, "kernels"); sys.path.insert(0, ".")
import torch
import bench.kernels as K
from bench import kernels_loss as L
impls = set(sys.argv[1].split(","))
shapes = sys.argv[2] if len(sys.argv) > 2 else ""
recs = []
for case in L.cases("cuda"):
    if shapes and shapes not in case.shape:
        continue
    for name, fn in case.impls.items():
        if name not in impls:
            continue
        rec = K.measure(case, name, fn)
        K.add_bandwidth(rec, case, 4300.0)
        print(json.dumps(rec), flush=True)
        recs.append(rec)
    torch.cuda.empty_cache()
env = K.environment(); env["copy_bandwidth_gbs"] = 4300.0
print(K.markdown(recs, env))
