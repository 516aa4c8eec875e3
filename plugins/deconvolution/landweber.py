"""Projected Landweber deconvolution."""

from __future__ import annotations

from collections.abc import Mapping

from rqml_dask.models import Array, ArrayBackend, RefinementModel
from rqml_plugins.deconvolution._convolution import Convolver


class Landweber(RefinementModel):
    """Projected Landweber: ``x <- max(0, x + tau * adjoint(image - forward(x)))``.

    ``problem`` is ``{"image": float32 array, "psf": float32 array}`` (and ``"background"``) as for Richardson-Lucy
    (the PSF is normalised to unit sum, so ``|OTF| <= 1``). ``step_size`` is ``tau``, in
    ``(0, 2)`` for convergence. Like Richardson-Lucy it refines the object on the domain one
    PSF larger than the window and predicts only the observed voxels
    (:class:`~rqml_plugins.deconvolution._convolution.Convolver`): ``estimate`` is the object
    at the window, ``state()["estimate"]`` the whole domain. The default start is the image
    clamped at 0, extended by its edges. ``misfit()`` is ``||forward(object) - image||_2 /
    ||image||_2``, recomputed and summed in float64.
    """

    task_class = "deconvolution"
    family = "landweber"
    size = 1
    immutable_state = True

    def __init__(
        self,
        problem: Mapping[str, Array],
        backend: ArrayBackend,
        *,
        step_size: float = 1.0,
    ) -> None:
        if not 0.0 < step_size < 2.0:
            raise ValueError(f"step_size must be in (0, 2), not {step_size!r}")
        super().__init__(problem, backend)
        xp = self.xp
        self.step_size = float(step_size)
        self.image = xp.astype(problem["image"], xp.float32, copy=False)
        self.convolver = Convolver(problem["psf"], tuple(self.image.shape), backend, problem.get("background", 0.0))
        self.start()

    def start(self, estimate: Array | None = None) -> None:
        xp = self.xp
        self._object = self.convolver.extend(xp.maximum(self.image, 0.0) if estimate is None else estimate)

    def step(self) -> None:
        update = self.convolver.gradient(self._object, self.image)
        update *= -self.step_size
        update += self._object
        self._object = self.xp.maximum(update, 0.0)

    @property
    def estimate(self) -> Array:
        return self._object[self.convolver.window]

    def state(self) -> dict[str, Array]:
        return {"estimate": self._object[self.convolver.domain]}

    def misfit(self) -> float:
        return self.convolver.residual_norm(self._object, self.image)

    def prediction(self) -> Array:
        return self.convolver.prediction(self._object)

    def object_weights(self, shape: tuple[int, ...]) -> Array:
        return self.convolver.object_weights(shape)
