import sys; sys.path.insert(0, '/work/scratch')
import numpy as np, torch, torchvision, jax, jax.numpy as jnp
from ra import roi_align
rng = np.random.default_rng(1)
N,H,W,C = 2, 11, 9, 3
f = rng.standard_normal((N,H,W,C)).astype(np.float32)
R = 50
xy = rng.uniform(-20, 60, (R, 2)); wh = rng.uniform(0, 50, (R,2))
b = np.concatenate([xy, xy+wh], 1).astype(np.float32)
idx = rng.integers(0, N, R).astype(np.int32)
g = rng.standard_normal((R, 7, 7, C)).astype(np.float32)
for sr in [-1, 2]:
  for aligned in [False, True]:
    ft = torch.from_numpy(f).permute(0,3,1,2).clone().requires_grad_()
    t = torchvision.ops.roi_align(ft, torch.from_numpy(np.concatenate([idx[:,None], b],1).astype(np.float32)), 7, 0.25, sr, aligned)
    (t * torch.from_numpy(g).permute(0,3,1,2)).sum().backward()
    tg = ft.grad.permute(0,2,3,1).numpy()
    jg = jax.grad(lambda f: jnp.sum(roi_align(f,b,idx,output_size=7,spatial_scale=0.25,sampling_ratio=sr,aligned=aligned)*g))(f)
    print(sr, aligned, np.abs(np.asarray(jg)-tg).max()/np.abs(tg).max())
from jax.test_util import check_grads
fn = lambda f, b: roi_align(f, b, idx[:5], output_size=3, spatial_scale=0.25, sampling_ratio=-1)
check_grads(fn, (f, b[:5]+0.137), order=2, modes=["fwd","rev"], atol=1e-2, rtol=1e-2)
print("check_grads ok")
