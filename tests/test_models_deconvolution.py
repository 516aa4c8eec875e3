"""The built-in deconvolution models: the boundary-normalised forward model, convergence, resume, backends."""

from __future__ import annotations

import math

import array_api_strict
import numpy as np
import pytest
import scipy.fft
import scipy.signal

from rqml_dask.arrays import ArrayBackend, numpy_backend
from rqml_dask.models import load_model, registered_models
from rqml_plugins.deconvolution._convolution import Convolver, _per_element, halo_for, transform_shape
from rqml_plugins.deconvolution.landweber import Landweber
from rqml_plugins.deconvolution.richardson_lucy import (
    AcceleratedRichardsonLucy,
    RichardsonLucy,
    TotalVariationRichardsonLucy,
)

DECONVOLUTION_MODELS = [
    name for name in registered_models() if load_model(name).task_class == "deconvolution"
]
STRICT = ArrayBackend(xp=array_api_strict, name="array_api_strict")


def gaussian_psf(shape: tuple[int, ...], sigma: float = 1.5) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64)
    r2 = sum(((g - (n - 1) / 2) / sigma) ** 2 for g, n in zip(grid, shape, strict=True))
    psf = np.exp(-r2 / 2)
    return (psf / psf.sum()).astype(np.float32)


def blurred_beads(
    shape: tuple[int, ...], psf: np.ndarray, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(truth, image): bright beads on a dim textured background, blurred by ``psf``."""
    rng = np.random.default_rng(seed)
    truth = (0.2 + 0.1 * rng.random(shape)).astype(np.float32)
    truth[tuple(rng.integers(0, n, 30) for n in shape)] += 5.0
    return truth, scipy.signal.convolve(truth, psf, mode="same").astype(np.float32)


def run(model, steps: int) -> np.ndarray:
    for _ in range(steps):
        model.step()
    return np.asarray(model.backend.to_numpy(model.estimate))


@pytest.mark.parametrize(
    ("image_shape", "psf_shape"),
    [((63, 64), (5, 6)), ((64, 63), (4, 7)), ((31, 32, 33), (4, 5, 6)), ((32, 31, 33), (7, 5, 3))],
)
def test_convolver_is_scipy_valid_convolution_and_its_exact_adjoint(image_shape, psf_shape):
    rng = np.random.default_rng(1)
    psf = rng.random(psf_shape).astype(np.float32)
    psf /= psf.sum()
    convolver = Convolver(psf, image_shape, numpy_backend())
    assert convolver.object_shape == tuple(n + p - 1 for n, p in zip(image_shape, psf_shape))
    x = rng.random(convolver.object_shape).astype(np.float32)
    y = rng.random(image_shape).astype(np.float32)

    forward = convolver.forward(x)
    assert forward.dtype == np.float32 and forward.shape == image_shape
    expected = scipy.signal.convolve(x.astype(np.float64), psf.astype(np.float64), mode="valid")
    np.testing.assert_allclose(forward, expected, rtol=0, atol=1e-6 * expected.max())
    # An object that is zero past the window blurs as the window alone does ("same" mode).
    inside = np.zeros_like(x)
    inside[convolver.window] = x[convolver.window]
    same = scipy.signal.convolve(x[convolver.window].astype(np.float64), psf.astype(np.float64), mode="same")
    np.testing.assert_allclose(convolver.forward(inside), same, rtol=0, atol=1e-6 * same.max())
    # <forward x, y> == <x, adjoint y>, to float32 rounding.
    lhs = np.vdot(forward.astype(np.float64), y)
    rhs = np.vdot(x, convolver.adjoint(y).astype(np.float64))
    assert abs(lhs - rhs) <= 1e-6 * abs(lhs)


def test_convolvers_of_one_psf_and_image_shape_share_their_operators_and_no_other_convolver_does():
    """A node's tasks of one tile shape reuse the transfer function and normalisation; a PSF
    of other values, or of the same values in another shape, or another image shape, gets
    its own, and each is still the exact valid convolution and normalisation."""
    rng = np.random.default_rng(2)
    flat = rng.random(24).astype(np.float32)
    psfs = {"a": flat.reshape(2, 3, 4), "same bytes, other shape": flat.reshape(4, 3, 2), "b": flat[::-1].reshape(2, 3, 4)}
    built = []
    for name, image_shape in [("a", (9, 10, 11)), ("same bytes, other shape", (9, 10, 11)), ("b", (9, 10, 11)),
                              ("a", (9, 10, 12)), ("a", (9, 10, 11)), ("a", (9, 10, 11))]:
        psf = psfs[name] / psfs[name].sum()
        convolver = Convolver(psf, image_shape, numpy_backend())
        x = rng.random(convolver.object_shape).astype(np.float32)
        expected = scipy.signal.convolve(x.astype(np.float64), psf.astype(np.float64), mode="valid")
        np.testing.assert_allclose(convolver.forward(x), expected, rtol=0, atol=1e-6 * expected.max())
        weight = scipy.signal.convolve(np.ones(image_shape), psf[::-1, ::-1, ::-1].astype(np.float64), mode="full")
        np.testing.assert_allclose(convolver.normalisation[convolver.domain], 1.0 / weight, rtol=1e-5)
        built.append(convolver)
    assert built[5]._otf is built[4]._otf and built[5].normalisation is built[4].normalisation
    assert len({id(c._otf) for c in built[:5]}) == 5
    with pytest.raises(ValueError, match="read-only"):
        built[5].normalisation *= 2.0


@pytest.mark.parametrize(
    ("image_shape", "psf_shape"),
    [((70, 86, 86), (13, 9, 9)), ((40, 264, 520), (7, 7, 7)), ((128, 128, 128), (21, 25, 25)), ((5, 300), (5, 41)), ((1, 7), (1, 5))],
)
def test_transforms_run_at_a_fast_shape_covering_the_object_domain_and_never_dearer_than_next_fast_len(image_shape, psf_shape):
    def smooth(n: int) -> bool:
        for radix in (2, 3, 5, 7):
            while n % radix == 0:
                n //= radix
        return n == 1

    def cost(shape: tuple[int, ...]) -> float:
        return math.prod(shape) * sum(map(_per_element, shape))

    domain = [n + p - 1 for n, p in zip(image_shape, psf_shape)]
    shape = transform_shape(image_shape, psf_shape)
    assert all(m <= n <= math.ceil(1.25 * m) and smooth(n) for n, m in zip(shape, domain)), (shape, domain)
    assert cost(shape) <= cost(tuple(scipy.fft.next_fast_len(m, True) for m in domain))
    assert Convolver(gaussian_psf(psf_shape), image_shape, numpy_backend()).fft_shape == shape


@pytest.mark.parametrize(
    ("image_shape", "psf_shape"),
    [((63, 64), (5, 5)), ((64, 63), (7, 3)), ((63, 64), (4, 6)), ((31, 32, 33), (4, 5, 6))],
)
def test_richardson_lucy_is_the_boundary_normalised_update(image_shape, psf_shape):
    """Step for step, ``x *= H'(y / Hx) / H'1`` on the object domain, H the "valid"
    convolution, written here with SciPy alone (float64)."""
    psf = gaussian_psf(psf_shape)
    _, image = blurred_beads(image_shape, psf)
    psf64, image64 = psf.astype(np.float64), image.astype(np.float64)
    weight = scipy.signal.convolve(np.ones_like(image64), np.flip(psf64), mode="full")
    x = np.full(weight.shape, image64.mean())
    for _ in range(30):
        ratio = image64 / (scipy.signal.convolve(x, psf64, mode="valid") + 1e-12)
        x *= scipy.signal.convolve(ratio, np.flip(psf64), mode="full") / weight
    window = tuple(slice(p // 2, p // 2 + n) for n, p in zip(image_shape, psf_shape))

    ours = run(RichardsonLucy({"image": image, "psf": psf}, numpy_backend()), 30)

    assert ours.dtype == np.float32 and ours.shape == image_shape
    np.testing.assert_allclose(ours, x[window], rtol=1e-4, atol=1e-5 * x.max())


@pytest.mark.parametrize(("image_shape", "psf_shape"), [((16, 20, 24), (5, 7, 3)), ((33, 40), (15, 15))])
def test_circular_richardson_lucy_is_the_update_on_a_torus_at_the_window_s_own_shape(image_shape, psf_shape):
    """``boundary: circular``: step for step, RL with the PSF centred on the origin of a
    torus the size of the window (written here with NumPy's complex FFTs, float64), the
    transforms at the window's own shape; a voxel blurs into the PSF around it, and one at
    an edge wraps to the other side."""
    psf = gaussian_psf(psf_shape) * (1 + np.random.default_rng(2).random(psf_shape, dtype=np.float32))  # not symmetric
    psf /= psf.sum()
    _, image = blurred_beads(image_shape, gaussian_psf(psf_shape))
    centred = np.zeros(image_shape)
    centred[tuple(slice(0, p) for p in psf_shape)] = psf
    transfer = np.fft.fftn(np.roll(centred, [-(p // 2) for p in psf_shape], axis=tuple(range(len(psf_shape)))))
    blur = lambda x: np.real(np.fft.ifftn(np.fft.fftn(x) * transfer))  # noqa: E731
    correlate = lambda x: np.real(np.fft.ifftn(np.fft.fftn(x) * np.conj(transfer)))  # noqa: E731
    model = RichardsonLucy({"image": image, "psf": psf}, numpy_backend(), boundary="circular")
    assert model.convolver.fft_shape == image_shape
    x = model.estimate.astype(np.float64)
    for _ in range(20):
        x = x * correlate(image / (blur(x) + 1e-12))
    np.testing.assert_allclose(run(model, 20), x, rtol=1e-4, atol=1e-5 * x.max())

    delta = np.zeros(image_shape, np.float32)
    delta[(0,) * len(image_shape)] = 1.0  # a corner: its blur wraps around every axis
    blurred = model.convolver.forward(delta)
    expected = np.roll(centred, [-(p // 2) for p in psf_shape], axis=tuple(range(len(psf_shape))))
    np.testing.assert_allclose(blurred, expected, atol=1e-6)
    with pytest.raises(ValueError, match="boundary must be one of"):
        RichardsonLucy({"image": image, "psf": psf}, numpy_backend(), boundary="mirror")


def test_a_tile_agrees_with_the_whole_volume_under_a_wide_psf():
    """The core of a window refined alone equals the same voxels refined in the whole image
    (the window's edge invents no data): within 2 % with the halo :func:`halo_for` gives,
    where a zero boundary at the window's edge is far off."""
    rng = np.random.default_rng(3)
    grid = np.indices((21, 21), dtype=np.float64) - 10
    r = np.hypot(*grid)
    psf = (np.exp(-r**2 / 4) + 0.05 * np.exp(-((r - 6) ** 2) / 2)).astype(np.float32)  # a core and a far ring
    psf /= psf.sum()
    truth = np.zeros((160, 160), np.float32)
    truth[tuple(rng.integers(0, 160, (2, 60)))] = rng.uniform(50, 100, 60)
    truth += 1
    image = rng.poisson(scipy.signal.convolve(truth, psf, mode="same").clip(0) * 50).astype(np.float32) / 50
    iterations = 50
    halo = halo_for(psf, iterations)
    assert halo[0] > psf.shape[0] // 2
    core = (slice(60, 100), slice(60, 100))
    window = tuple(slice(c.start - h, c.stop + h) for c, h in zip(core, halo))
    in_window = tuple(slice(h, h + 40) for h in halo)

    whole = run(RichardsonLucy({"image": image, "psf": psf}, numpy_backend()), iterations)[core]
    tile = run(RichardsonLucy({"image": image[window], "psf": psf}, numpy_backend()), iterations)[in_window]

    assert np.linalg.norm(tile - whole) <= 0.02 * np.linalg.norm(whole)


@pytest.mark.parametrize("psf_shape", [(7, 7), (6, 6)])
@pytest.mark.parametrize("name", DECONVOLUTION_MODELS)
def test_model_lowers_misfit_and_stays_nonnegative(name, psf_shape):
    # An even-sized PSF is where a back-projection one pixel off the adjoint made the
    # accelerated model diverge.
    psf = gaussian_psf(psf_shape)
    _, image = blurred_beads((48, 50), psf)
    model = load_model(name)({"image": image, "psf": psf}, numpy_backend())
    misfits = [model.misfit()]
    for _ in range(20):
        model.step()
        misfits.append(model.misfit())

    estimate = model.estimate
    assert estimate.dtype == np.float32 and estimate.shape == image.shape
    assert np.all(np.isfinite(estimate)) and estimate.min() >= 0
    assert all(isinstance(m, float) and np.isfinite(m) for m in misfits)
    assert misfits[-1] < 0.5 * misfits[0]


@pytest.mark.parametrize("name", DECONVOLUTION_MODELS)
def test_restored_model_continues_exactly(name):
    psf = gaussian_psf((5, 5, 5))
    _, image = blurred_beads((20, 21, 22), psf)
    problem = {"image": image, "psf": psf}
    cls = load_model(name)

    interrupted = cls(problem, numpy_backend())
    run(interrupted, 10)
    state = {key: np.array(value) for key, value in interrupted.state().items()}
    resumed = cls(problem, numpy_backend())
    resumed.restore(state)

    np.testing.assert_array_equal(run(resumed, 5), run(cls(problem, numpy_backend()), 15))


def test_accelerated_start_forgets_history():
    psf = gaussian_psf((5, 5))
    _, image = blurred_beads((32, 33), psf)
    problem = {"image": image, "psf": psf}
    accelerated = AcceleratedRichardsonLucy(problem, numpy_backend())
    run(accelerated, 5)
    estimate = np.array(accelerated.estimate)
    accelerated.start(estimate)
    assert set(accelerated.state()) == {"estimate", "alpha"}

    # The first step after start() is a plain Richardson-Lucy step.
    plain = RichardsonLucy(problem, numpy_backend())
    plain.start(estimate)
    np.testing.assert_array_equal(run(accelerated, 1), run(plain, 1))


@pytest.mark.parametrize("name", DECONVOLUTION_MODELS)
def test_model_runs_under_strict_array_api(name):
    psf = gaussian_psf((4, 5, 5))
    _, image = blurred_beads((16, 17, 18), psf)
    cls = load_model(name)
    on_numpy = cls({"image": image, "psf": psf}, numpy_backend())
    strict_problem = {"image": STRICT.asarray(image), "psf": STRICT.asarray(psf)}
    on_strict = cls(strict_problem, STRICT)

    expected, got = run(on_numpy, 8), run(on_strict, 8)

    assert got.dtype == np.float32
    # numpy.fft and scipy.fft round float32 differently: measured <= 6e-7 of the maximum.
    np.testing.assert_allclose(got, expected, rtol=0, atol=5e-6 * expected.max())
    assert on_strict.misfit() == pytest.approx(on_numpy.misfit(), rel=1e-6)
    restored = cls(strict_problem, STRICT)
    restored.restore(on_strict.state())
    assert np.array_equal(STRICT.to_numpy(restored.estimate), got)


@pytest.mark.parametrize(
    ("cls", "params"),
    [
        (RichardsonLucy, {"regularization": 0.01}),
        (AcceleratedRichardsonLucy, {"step_size": 1.0}),
        (TotalVariationRichardsonLucy, {"lam": 0.01}),
        (Landweber, {"iterations": 3}),
    ],
)
def test_unknown_params_raise_type_error(cls, params):
    psf = gaussian_psf((3, 3))
    with pytest.raises(TypeError):
        cls({"image": np.ones((8, 8), np.float32), "psf": psf}, numpy_backend(), **params)


@pytest.mark.parametrize("step_size", [0.0, -0.5, 2.0, 3.0, float("nan")])
def test_landweber_rejects_step_size_outside_open_interval(step_size):
    problem = {"image": np.ones((8, 8), np.float32), "psf": gaussian_psf((3, 3))}
    with pytest.raises(ValueError, match="step_size"):
        Landweber(problem, numpy_backend(), step_size=step_size)


def test_documented_params_are_accepted():
    problem = {"image": np.ones((8, 8), np.float32), "psf": gaussian_psf((3, 3))}
    assert Landweber(problem, numpy_backend(), step_size=1.9).step_size == 1.9
    tv = TotalVariationRichardsonLucy(problem, numpy_backend(), regularization=0.01)
    assert tv.regularization == 0.01
    with pytest.raises(ValueError, match="regularization"):
        TotalVariationRichardsonLucy(problem, numpy_backend(), regularization=-1.0)


def test_psf_larger_than_image_is_rejected():
    with pytest.raises(ValueError, match="psf"):
        RichardsonLucy(
            {"image": np.ones((8, 8), np.float32), "psf": gaussian_psf((9, 3))}, numpy_backend()
        )


def test_richardson_lucy_step_batch_equals_stepping_one_at_a_time():
    from rqml_dask.synthetic import gaussian_psf

    backend = numpy_backend()
    rng = np.random.default_rng(5)
    psf = gaussian_psf((1.0, 1.5, 1.5))
    images = [rng.random((12, 20, 21)).astype(np.float32) for _ in range(3)]
    batched = [RichardsonLucy({"image": im, "psf": psf}, backend) for im in images]
    alone = [RichardsonLucy({"image": im, "psf": psf}, backend) for im in images]
    keys = {m.batch_key() for m in batched}
    assert len(keys) == 1 and None not in keys  # one batch
    for _ in range(4):
        RichardsonLucy.step_batch(batched)
        for m in alone:
            m.step()
    for b, a in zip(batched, alone):
        np.testing.assert_array_equal(b.estimate, a.estimate)
    other = RichardsonLucy({"image": images[0], "psf": gaussian_psf((1.0, 1.0, 1.0))}, backend)
    assert other.batch_key() != batched[0].batch_key()  # another PSF: not batched together


@pytest.mark.parametrize("name", ["richardson_lucy_accelerated", "richardson_lucy_tv", "landweber"])
def test_models_with_more_state_than_the_estimate_are_never_batched(name):
    # Their per-task state (extrapolation history, regulariser, step size) is not stacked by
    # RichardsonLucy.step_batch: the node must step each of them alone.
    from rqml_dask.synthetic import gaussian_psf

    problem = {"image": np.random.default_rng(5).random((12, 20, 21)).astype(np.float32), "psf": gaussian_psf((1.0, 1.5, 1.5))}
    assert load_model(name)(problem, numpy_backend()).batch_key() is None
