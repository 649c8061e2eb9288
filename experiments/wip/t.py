import sys; sys.path.insert(0, '/work/scratch')
import numpy as np, torch, torchvision, jax, jax.numpy as jnp
jax.config.update("jax_enable_x64", False)
from ra import roi_align
rng = np.random.default_rng(0)
N,H,W,C = 2, 13, 17, 5
f = rng.standard_normal((N,H,W,C)).astype(np.float32)
R = 300
xy = rng.uniform(-40, 120, (R, 2)); wh = rng.uniform(0, 90, (R,2))**rng.uniform(0.5,1.2,(R,1))
b = np.concatenate([xy, xy+wh], 1).astype(np.float32)
b[:10, 2:] = b[:10, :2] + rng.uniform(0, 0.5, (10, 2))  # tiny
b[10:15] = b[10:15, [2,3,0,1]]  # inverted
idx = rng.integers(0, N, R).astype(np.int32)
for sr in [-1, 0, 1, 2, 3]:
  for aligned in [False, True]:
    for scale in [0.125, 0.5, 1/3]:
      for os_ in [(7,7),(3,5),(1,1)]:
        t = torchvision.ops.roi_align(torch.from_numpy(f).permute(0,3,1,2), torch.from_numpy(np.concatenate([idx[:,None], b],1).astype(np.float32)), os_, scale, sr, aligned).permute(0,2,3,1).numpy()
        j = np.asarray(jax.jit(lambda f,b,i: roi_align(f,b,i,output_size=os_,spatial_scale=scale,sampling_ratio=sr,aligned=aligned))(f,b,idx))
        err = np.abs(j-t).max()/ np.abs(t).max()
        if err > 1e-6: print(sr, aligned, scale, os_, err)
print("done")
