import numpy as np, torch, torchvision, jax, jax.numpy as jnp
from spp_jax.align import roi_align, ps_roi_align, ps_roi_pool
rng = np.random.default_rng(0)
N,H,W = 2, 13, 17
R = 200
xy = rng.uniform(-40, 120, (R, 2)); wh = rng.uniform(0, 90, (R,2))**rng.uniform(0.5,1.2,(R,1))
b = np.concatenate([xy, xy+wh], 1).astype(np.float32)
b[:10, 2:] = b[:10, :2] + rng.uniform(0, 0.5, (10, 2))
b[10:15] = b[10:15, [2,3,0,1]]
idx = rng.integers(0, N, R).astype(np.int32)
rois = torch.from_numpy(np.concatenate([idx[:,None], b],1).astype(np.float32))
worst = {}
for op in ["roi_align", "ps_roi_align", "ps_roi_pool"]:
  for os_ in [(7,7),(3,5),(1,1)]:
    C = 5 if op == "roi_align" else 2*os_[0]*os_[1]
    f = rng.standard_normal((N,H,W,C)).astype(np.float32)
    ft = torch.from_numpy(f).permute(0,3,1,2).contiguous()
    for sr in ([-1, 0, 1, 2, 3] if op != "ps_roi_pool" else [None]):
      for aligned in ([False, True] if op == "roi_align" else [None]):
        for scale in [0.125, 0.5, 1/3]:
          if op == "roi_align":
            t = torchvision.ops.roi_align(ft, rois, os_, scale, sr, aligned)
            j = roi_align(f, b, idx, output_size=os_, spatial_scale=scale, sampling_ratio=sr, aligned=aligned)
          elif op == "ps_roi_align":
            t = torchvision.ops.ps_roi_align(ft, rois, os_, scale, sr)
            j = ps_roi_align(f, b, idx, output_size=os_, spatial_scale=scale, sampling_ratio=sr)
          else:
            t = torchvision.ops.ps_roi_pool(ft, rois, os_, scale)
            j = ps_roi_pool(f, b, idx, output_size=os_, spatial_scale=scale)
          t = t.permute(0,2,3,1).numpy(); j = np.asarray(j)
          nan = np.isnan(t)
          err = np.abs(np.where(nan, 0, j - t)).max() / np.abs(np.nan_to_num(t)).max()
          key=(op, sr, aligned)
          worst[key]=max(worst.get(key,0), err)
          if nan.any(): print(op, "torch NaN at", nan.sum(), "ours there", np.unique(j[nan]))
for k,v in worst.items(): print(k, f"{v:.2e}")
