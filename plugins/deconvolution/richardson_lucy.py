"""Richardson-Lucy deconvolution: plain, vector-extrapolated, and total-variation regularised.

``problem`` is ``{"image": float32 array, "psf": float32 array}`` and optionally
``"background"``, a known constant the blur adds (a camera's read-noise pedestal; 0 by
default): the PSF has the image's rank and at most its size on every axis, and is
normalised to unit sum here. Each model
refines the object on the domain one PSF larger than the window, predicting only the
observed voxels (:class:`~rqml_plugins.deconvolution._convolution.Convolver`); ``estimate``
is the object at the window (float32, the image's shape), ``state()["estimate"]`` the whole
object domain, and ``start()`` takes either (a window-shaped one extended by its edges).
The models hold the object transform-shaped, zero past the domain (``Convolver.extend``).
:meth:`RichardsonLucy.misfit` is ``||forward(object) - image||_2 / ||image||_2``, recomputed
and summed in float64.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import ModuleType

from rqml_dask.models import Array, ArrayBackend, RefinementModel, inner_products
from rqml_plugins.deconvolution._convolution import Convolver, _along

EPSILON = 1e-12
"""Added to the re-blurred estimate before dividing, as scikit-image does."""

TV_GRADIENT_EPSILON = 1e-6
"""Keeps ``|grad(estimate)|`` away from zero where the estimate is flat."""

TV_DENOMINATOR_FLOOR = 1e-4
"""Smallest TV denominator ``1 - lam * div(...)``; a larger ``lam`` could make it <= 0."""


class RichardsonLucy(RefinementModel):
    """Richardson-Lucy with the boundary normalisation of Bertero & Boccacci:
    ``x *= adjoint(image / (forward(x) + 1e-12)) / adjoint(ones)`` on the object domain.

    The default start is the image's mean less the background (at least 1e-6) everywhere. Where the window is
    the whole of a periodic-free volume's support, this is Richardson-Lucy on the ``"valid"``
    blur model; it never assumes zeros or mirrored data past the window.
    """

    task_class = "deconvolution"
    family = "richardson_lucy"
    size = 1
    immutable_state = True

    def __init__(self, problem: Mapping[str, Array], backend: ArrayBackend, *, boundary: str = "exact") -> None:
        super().__init__(problem, backend)
        xp = self.xp
        self.image = xp.astype(problem["image"], xp.float32, copy=False)
        self.convolver = Convolver(problem["psf"], tuple(self.image.shape), backend, problem.get("background", 0.0), boundary)
        self.start()

    def start(self, estimate: Array | None = None) -> None:
        xp = self.xp
        if estimate is None:
            level = max(float(xp.sum(self.image, dtype=xp.float64)) / max(self.image.size, 1) - self.convolver.background, 1e-6)
            self._object = xp.where(self.convolver.normalisation > 0.0, xp.asarray(level, dtype=xp.float32),
                                    xp.asarray(0.0, dtype=xp.float32))
            return
        self._object = self.convolver.extend(estimate)

    def _correction(self, x: Array) -> Array:
        """The Richardson-Lucy factor ``adjoint(image / (forward(x) + background + 1e-12)) /
        adjoint(ones)`` (a fresh array). ``forward(x) + background`` is the convolver's
        :meth:`~Convolver.prediction`: a convergence check of ``x`` just made it, and the
        step after the check takes it from there instead of blurring ``x`` again."""
        return self.convolver.richardson_lucy_factor(x, self.image, EPSILON)

    def step(self) -> None:
        correction = self._correction(self._object)
        correction *= self._object
        self._object = correction  # a fresh array: the previous estimate stays as it was

    def batch_key(self) -> tuple | None:
        # Subclasses carry extra per-task state: only plain Richardson-Lucy batches.
        if type(self) is not RichardsonLucy:
            return None
        return (RichardsonLucy, tuple(self.image.shape), self.convolver.psf_digest, self.convolver.background,
                self.convolver.circular, self.backend.name)

    @classmethod
    def step_batch(cls, models: Sequence[RefinementModel]) -> None:
        """One RL iteration of every model in two batched convolutions (same PSF and shape)."""
        if len(models) < 2 or models[0].batch_key() is None:  # a subclass: one by one
            return super().step_batch(models)
        first = models[0]
        xp, convolver = first.xp, first.convolver
        objects = xp.stack([m._object for m in models])
        correction = convolver.richardson_lucy_factor(objects, xp.stack([m.image for m in models]), EPSILON)
        correction *= objects
        del objects
        for i, model in enumerate(models):
            model._object = correction[i, ...]

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


class AcceleratedRichardsonLucy(RichardsonLucy):
    """Richardson-Lucy with Biggs & Andrews (1997) vector extrapolation.

    Step ``k`` predicts ``y_k = max(0, x_k + alpha_k (x_k - x_{k-1}))``, updates
    ``x_{k+1} = RL(y_k)``, keeps ``g_k = x_{k+1} - y_k`` and sets
    ``alpha_{k+1} = clip(<g_k, g_{k-1}> / <g_{k-1}, g_{k-1}>, 0, 1)``; ``alpha`` is 0 for the
    first two steps. After step ``k``, :meth:`state` holds ``estimate`` (``x_{k+1}``),
    ``alpha`` (``alpha_{k+1}``, a float32 scalar array), ``previous`` (``x_k``) and
    ``change`` (``g_k``); :meth:`start` forgets the history (``alpha = 0``).
    """

    size = 2

    def start(self, estimate: Array | None = None) -> None:
        super().start(estimate)
        self._previous: Array | None = None
        self._change: Array | None = None
        self._alpha = self.xp.zeros((), dtype=self.xp.float32)

    def step(self) -> None:
        xp = self.xp
        x = self._object
        if self._previous is None:
            predicted = x
        else:
            predicted = x - self._previous
            predicted *= self._alpha
            predicted += x
            self.backend.clip_below_into(predicted, 0.0)
        updated = self._correction(predicted)
        updated *= predicted
        change = updated - predicted
        if self._change is not None:
            numerator, denominator = inner_products(xp, change, self._change)
            ratio = numerator / max(denominator, 1e-300)
            self._alpha = xp.asarray(min(max(ratio, 0.0), 1.0), dtype=xp.float32)
        self._previous, self._object, self._change = x, updated, change

    def state(self) -> dict[str, Array]:
        domain = self.convolver.domain
        state = {"estimate": self._object[domain], "alpha": self._alpha}
        if self._previous is not None:
            state["previous"] = self._previous[domain]
        if self._change is not None:
            state["change"] = self._change[domain]
        return state

    def restore(self, state: Mapping[str, Array]) -> None:
        xp = self.xp
        self.start(state["estimate"])
        if "previous" in state:
            self._previous = self.convolver.extend(state["previous"])
        if "change" in state:
            self._change = self.convolver.extend(state["change"])
        if "alpha" in state:
            self._alpha = xp.astype(state["alpha"], xp.float32, copy=True)


class TotalVariationRichardsonLucy(RichardsonLucy):
    """Richardson-Lucy with total-variation regularisation (Dey et al. 2006).

    ``est *= RL-factor(est) / max(1 - lam * div(grad est / |grad est|), 1e-4)``, with
    ``grad`` forward differences (0 at each axis's last index), ``div`` backward differences
    (minus the adjoint of ``grad``) and ``|grad| = sqrt(sum over axes of grad^2 + 1e-12)``.
    ``regularization`` is ``lam >= 0`` (0 gives plain Richardson-Lucy); keeping it below
    ``1 / (2 * ndim)`` keeps the denominator positive without the floor. A pipeline may
    give it as ``auto`` (:attr:`strength_grid`) or a list, to have each task choose
    (:mod:`rqml_dask.strength`).
    """

    size = 3
    regularizes = True
    strength = "regularization"
    strength_grid = (0.002, 0.005, 0.01, 0.02)

    def __init__(
        self,
        problem: Mapping[str, Array],
        backend: ArrayBackend,
        *,
        regularization: float = 0.002,
        boundary: str = "exact",
    ) -> None:
        if not 0.0 <= regularization < float("inf"):
            raise ValueError(f"regularization must be finite and >= 0, not {regularization!r}")
        self.regularization = float(regularization)
        super().__init__(problem, backend, boundary=boundary)

    def step(self) -> None:
        xp = self.xp
        x = self._object[self.convolver.domain]  # the object domain: no gradient into the zeros past it
        gradients = [_forward_difference(xp, x, axis) for axis in range(x.ndim)]
        magnitude = xp.full(x.shape, TV_GRADIENT_EPSILON**2, dtype=xp.float32)
        for gradient in gradients:
            magnitude += gradient * gradient
        magnitude = xp.sqrt(magnitude)
        denominator = xp.zeros_like(x)  # becomes div(grad x / |grad x|), then 1 - lam * div
        for axis, gradient in enumerate(gradients):
            gradient /= magnitude
            denominator += gradient
            denominator[_along(axis, slice(1, None))] -= gradient[_along(axis, slice(None, -1))]
        denominator *= -self.regularization
        denominator += 1.0
        correction = self._correction(self._object)
        correction[self.convolver.domain] /= xp.maximum(denominator, TV_DENOMINATOR_FLOOR)
        correction *= self._object
        self._object = correction


def _forward_difference(xp: ModuleType, x: Array, axis: int) -> Array:
    """``x[i+1] - x[i]`` along ``axis``, and 0 at the last index."""
    difference = xp.zeros_like(x)
    head = _along(axis, slice(None, -1))
    difference[head] = x[_along(axis, slice(1, None))]
    difference[head] -= x[head]
    return difference
