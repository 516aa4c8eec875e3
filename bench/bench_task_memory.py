"""What one Richardson-Lucy model holds and peaks at, in task windows (issue 30: worker peak RSS).

One model on a ``(40, 264, 520)`` float32 window (the 2 GiB bench's tile with its halo),
traced with ``tracemalloc`` (NumPy's allocations are traced): what it holds after
``__init__``, after its first step, after four more steps and a convergence check, and
after a check that also scores the prediction against held-out counts (20 %, over the core:
the window less a halo of 4), each with the peak on the way, in windows (the image's
bytes); then the lines holding the most.

    python bench/bench_task_memory.py
"""

import tracemalloc, numpy as np
from rqml_dask.arrays import numpy_backend
from rqml_dask.held_out import HeldOutScore
from rqml_plugins.deconvolution.richardson_lucy import RichardsonLucy
from rqml_dask.synthetic import gaussian_psf
shape = (40, 264, 520)
image = np.random.default_rng(0).poisson(20.0, shape).astype(np.float32)
psf = gaussian_psf((1.0, 1.0, 1.0))
W = image.nbytes
tracemalloc.start()
model = RichardsonLucy({"image": image, "psf": psf}, numpy_backend())
cur, peak = tracemalloc.get_traced_memory(); print(f"init: held {cur/W:.1f} windows, peak {peak/W:.1f}")
tracemalloc.reset_peak()
model.start(); model.step()
cur, peak = tracemalloc.get_traced_memory(); print(f"step1: held {cur/W:.1f}, peak {peak/W:.1f}")
tracemalloc.reset_peak()
for i in range(4): model.step()
model.misfit(); model.prediction()
cur, peak = tracemalloc.get_traced_memory(); print(f"steps+check: held {cur/W:.1f}, peak {peak/W:.1f}")
score = HeldOutScore(np.random.default_rng(1).binomial(image.astype(np.int64), 0.2).astype(np.float32), 1.0, 0.2,
                     numpy_backend(), tuple(slice(4, n - 4) for n in shape))
for i in range(5): model.step()
tracemalloc.reset_peak()
model.misfit(); score.deviance(model.prediction())
cur, peak = tracemalloc.get_traced_memory(); print(f"check with held-out score: held {cur/W:.1f}, peak {peak/W:.1f}")
snap = tracemalloc.take_snapshot()
for s in snap.statistics("lineno")[:8]: print(f"  {s.size/W:.2f} W  {s.traceback[0].filename.split('/')[-1]}:{s.traceback[0].lineno}")
print("fft shape", model.convolver.fft_shape, "object", model.convolver.object_shape, "image", shape)
