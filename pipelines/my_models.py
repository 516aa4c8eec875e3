"""Damped Van Cittert deconvolution: x <- max(0, x + beta (image - psf * x))."""
import time

from rqml_dask.models import RefinementModel


class VanCittert(RefinementModel):
    task_class = "deconvolution"
    family = "van_cittert"
    immutable_state = True  # step() replaces the estimate, never writes into it

    def __init__(self, problem, backend, *, beta=1.0, delay=0.0):
        super().__init__(problem, backend)
        xp = self.xp
        self.image = xp.astype(problem["image"], xp.float32)
        self.shape = tuple(self.image.shape)
        psf = xp.astype(problem["psf"], xp.float32)
        padded = xp.zeros(self.shape, dtype=xp.float32)
        padded[tuple(slice(0, n) for n in psf.shape)] = psf / xp.sum(psf)
        centred = xp.roll(padded, tuple(-(n // 2) for n in psf.shape), axis=tuple(range(psf.ndim)))
        self.otf = backend.rfftn(centred, self.shape)
        self.beta, self.delay = beta, delay
        self.start()

    def blur(self, x):
        return self.xp.astype(self.backend.irfftn(self.backend.rfftn(x, self.shape) * self.otf, self.shape), self.xp.float32)

    def start(self, estimate=None):
        self._x = self.xp.astype(self.image if estimate is None else estimate, self.xp.float32, copy=True)

    def step(self):
        time.sleep(self.delay)
        self._x = self.xp.maximum(self._x + self.beta * (self.image - self.blur(self._x)), 0.0)

    @property
    def estimate(self):
        return self._x

    def prediction(self):  # what the estimate predicts the data to be: the held-out stopping rule reads it
        return self.blur(self._x)

    def misfit(self):
        xp = self.xp
        residual = xp.astype(self.blur(self._x) - self.image, xp.float64)
        return float(xp.sqrt(xp.sum(residual**2)) / xp.sqrt(xp.sum(xp.astype(self.image, xp.float64) ** 2)))
