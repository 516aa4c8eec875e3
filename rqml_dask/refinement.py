"""The refinement engine: one task, one iteration per :meth:`Refinement.step`, up its ladder.

:class:`Refinement` owns the running model and the convergence monitor of one task. A caller
(the node's refinement queue) calls ``step()`` until
``done``; nothing here waits on the scheduler, the network or the disk, so many refinements
can be interleaved on one worker. A stall escalates to the next model of the ladder, which
starts from the current estimate; the outcome records every model run.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, astuple, dataclass, field
from typing import Any, Literal

from rqml_dask.arrays import Array, ArrayBackend, sum_of_squares
from rqml_dask.checkpoint import CheckpointError, ModelConfig, TaskCheckpoint
from rqml_dask.convergence import ConvergenceFigures, ConvergenceMonitor
from rqml_dask.held_out import HeldOutFigures, HeldOutScore
from rqml_dask.messages import ModelRun, TracePoint, thin
from rqml_dask.models import RefinementModel, load_model
from rqml_dask.strength import SIGNIFICANCE, StrengthSearch, strength_grid
from rqml_dask.task import RQMLTask

HELD_OUT_BEST = "held_out_best"
"""The checkpoint artifact holding the held-out rule's best iterate (beside the model's state)."""

SEARCH_ORIGIN, SEARCH_BEST = "strength_origin", "strength_best"
"""The checkpoint artifacts of a strength search (:class:`~rqml_dask.strength.StrengthSearch`):
the estimate its candidates start from and the best finished candidate's."""

Status = Literal["running", "converged", "stalled", "max_iterations", "terminated", "failed"]


@dataclass
class Snapshot:
    """A refinement's resumable state at one iteration, copied on the refinement thread."""

    task: RQMLTask
    iteration: int
    model_config: ModelConfig
    arrays: dict[str, Any]
    supervision_state: dict
    reason: str
    backend: ArrayBackend
    taken_at: float = field(default_factory=time.time)


@dataclass
class Refinement:
    """Refines one task's problem along the task's model ladder.

    ``problem`` maps names to arrays already on ``backend``. Build with :meth:`start`.
    """

    task: RQMLTask
    problem: dict[str, Array]
    backend: ArrayBackend
    status: Status = "running"
    iteration: int = 0
    ladder_position: int = 0
    runs: list[ModelRun] = field(default_factory=list)
    model: RefinementModel | None = None
    monitor: ConvergenceMonitor | None = None
    last_figures: ConvergenceFigures | None = None
    validation_failures: list[str] = field(default_factory=list)
    reason: str = ""
    started_at: float = field(default_factory=time.monotonic)
    finished_at: float | None = None
    resumed_from: int | None = None
    checkpoint_reason: str | None = None
    last_checkpoint_iteration: int = 0
    last_checkpoint_time: float = field(default_factory=time.monotonic)
    models: list[str] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    handed_back: bool = False
    held_out: HeldOutScore | None = None
    held_out_input: float | None = None
    best_held_out: float = math.inf
    best_iteration: int = 0
    best_estimate: Array | None = None
    by_object_error: bool = False
    """Whether the rule scores iterates by their held-out object error: ``held_out_score:
    object`` and every model of the ladder has ``object_weights()`` (else by the deviance, as
    a ladder with a model the object error cannot score must be)."""
    best_deviance: tuple[float, int] | None = None
    """Where the rule chooses by the object error (``held_out_score: object``), outside a
    strength search: the lowest held-out deviance of a checked iterate, and its iteration,
    the iterate the guard tries where the chosen one fails it (:meth:`validate`)."""
    fitted_noise: bool = False
    segments: list[tuple[str, int, int, float | None]] = field(default_factory=list)
    """Each model run as (model, the iteration its start estimate is at, the iteration it
    started at, the strength it was built with where a search chose it, else ``None``):
    what :meth:`_replay` follows to recompute an iterate on other data."""
    estimate_iteration: int = 0
    """The iteration the model's current estimate is at (behind :attr:`iteration` after a rollback)."""
    guard: HeldOutFigures | None = None
    """The held-out figures the guard judged the chosen iterate by, kept once it passed."""
    refitted: bool = False
    """Whether the result was computed again on all the counts (:meth:`_refit`)."""
    trace: list[TracePoint] = field(default_factory=list)
    """Every convergence check so far (one per ``check_every`` iterations of each model)."""
    checkpoints: list[int] = field(default_factory=list)
    """The iterations this run took checkpoints at (the live view marks them; bounded)."""
    search: StrengthSearch | None = None
    """The search over a regularising rung's strengths (:mod:`rqml_dask.strength`), once begun."""
    _weights: Array | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.models = self.models or list(self.task.model_ladder)
        if "held_out" in self.problem:
            settings = self.task.convergence
            self.held_out = HeldOutScore(self.problem["held_out"], self.task.input.counts_per_unit,
                                         settings.held_out_fraction, self.backend, self.task.region.core_in_window)
            self.by_object_error = settings.held_out_score == "object" and all(
                load_model(name).object_weights is not RefinementModel.object_weights for name in self.models)

    @classmethod
    def start(cls, task: RQMLTask, problem: dict[str, Array], backend: ArrayBackend) -> Refinement:
        refinement = cls(task, problem, backend)
        refinement._switch_model(0, estimate=None)
        if refinement.held_out is not None:  # the input taken as the estimate: what a result must beat
            refinement.model.start(refinement.input_estimate())
            if (prediction := refinement.model.prediction()) is not None:  # else nothing is scored
                refinement.held_out_input = refinement.held_out.deviance(prediction)
            refinement.model.start(None)
        return refinement

    def input_estimate(self) -> Array:
        """The data the models refine, taken as an estimate: the input a result must beat
        (less the problem's known ``background``, if any, clipped at 0)."""
        image, background = self.problem["image"], float(self.problem.get("background", 0.0))
        return self.backend.xp.maximum(image - background, 0.0) if background else image

    def _score(self) -> float | None:
        """The held-out score of the model's current prediction, if the rule is on: its
        object error, or its deviance where ``held_out_score`` asks for it (a candidate of a
        strength search is always scored by its object error: the iterate and the strength
        are chosen together, by the criterion that ranks regularised estimates)."""
        if self.held_out is None:
            return None
        prediction = self.model.prediction()
        if prediction is None:
            return None
        if self.by_object_error or (self.search is not None and self.search.running):
            return self.held_out.object_error(prediction, self._object_weights())
        return self.held_out.deviance(prediction)

    def held_out_figures(self) -> HeldOutFigures | None:
        """What the held-out rule saw, for the outcome, once the task is over: the held-out
        deviance of the input and of the chosen iterate (the model holds it), with the guard's
        figures of the one against the other (those it passed with, once kept: a result
        refitted on all the counts cannot be scored by them). ``None`` while it runs, where
        nothing was held out, where no iterate was checked, or for a failed task: its
        estimate is no result, and its model, which raised, is not asked again."""
        if self.guard is not None:
            return self.guard
        if self.held_out_input is None or self.best_estimate is None or not self.done or self.status == "failed":
            return None
        prediction = self.model.prediction()
        baseline = self._build(self.model_name, self.problem)
        baseline.start(self.input_estimate())
        significance = self.held_out.significance(prediction, baseline.prediction())
        departure = self.held_out.departure(self.estimate, self.problem["observed"],
                                            float(self.problem.get("background", 0.0)))
        in_object = None
        if self.by_object_error or self.search is not None:  # the criterion that chose the iterate
            in_object = self.held_out.object_significance(prediction, baseline.prediction(), self._object_weights())
        return HeldOutFigures(self.held_out_input, self.held_out.deviance(prediction), self.best_iteration,
                              self.held_out.fraction, significance, departure,
                              self.search.chosen if self.search is not None else None, in_object)

    @property
    def done(self) -> bool:
        return self.status != "running"

    @property
    def model_name(self) -> str:
        return self.models[self.ladder_position]

    @property
    def escalations(self) -> int:
        """Model switches (a strength search's candidates count as one rung)."""
        candidates = sum(run.strength is not None for run in self.runs)
        return len(self.runs) - 1 - max(candidates - 1, 0)

    @property
    def can_escalate(self) -> bool:
        return self.ladder_position + 1 < len(self.models)

    @property
    def estimate(self) -> Array:
        assert self.model is not None
        return self.model.estimate

    def step(self) -> None:
        """Advance one iteration; after it, run the checks that fall due."""
        previous = self.before_step()
        self.model.step()
        self.after_step(previous)

    def before_step(self) -> Array | None:
        """First half of :meth:`step`, for callers that step several models in one batch:
        call it, advance ``self.model`` by one iteration, then :meth:`after_step` with its
        result. Returns a copy of the estimate when this iteration ends with a check."""
        assert self.model is not None and not self.done
        check = (self.runs[-1].iterations + 1) % (self.model.check_every or self.task.convergence.check_every) == 0
        return self._keep(self.model.estimate) if check else None

    def _keep(self, array: Array) -> Array:
        """``array`` as it is now, past the model's next step (a copy unless immutable)."""
        return array if self.model.immutable_state else self.backend.xp.asarray(array, copy=True)

    def after_step(self, previous: Array | None) -> None:
        """Second half of :meth:`step`: count the iteration, run the checks that fall due."""
        settings = self.task.convergence
        run = self.runs[-1]
        xp = self.backend.xp
        run.iterations += 1
        self.iteration += 1
        self.estimate_iteration = self.iteration
        if previous is not None:
            change = _relative_change(xp, self.model.estimate, previous)
            held_out = self._score()
            if held_out is not None and self.by_object_error and self.search is None:
                deviance = self.held_out.deviance(self.model.prediction())
                if self.best_deviance is None or deviance < self.best_deviance[0]:
                    self.best_deviance = (deviance, self.iteration)
            if held_out is not None and held_out < self.best_held_out:
                self.best_held_out, self.best_iteration = held_out, self.iteration
                self.best_estimate = self._keep(self.model.state()["estimate"])
            verdict = self.monitor.observe(run.iterations, change, self.model.misfit(), held_out)
            self.last_figures = figures = self.monitor.latest
            if figures is not None:
                self.trace.append(TracePoint(self.iteration, self.model_name, figures.misfit, figures.stability,
                                             figures.consistency, figures.novelty))
                self.trace = thin(self.trace)
            searching = self.search is not None and self.search.running
            if held_out is not None and verdict == "converged":
                # settling iterates are no sign of the optimum (the held-out counts say where it is), but of slow
                # progress towards it: on to the next model of the ladder if it is a faster one, else go on
                if not searching and self.can_escalate and not load_model(self.models[self.ladder_position + 1]).regularizes:
                    verdict = "stalled"
                    self.reason = "settled while the held-out fit still improves"
                else:
                    verdict = "continue"
            if held_out is not None and min(self.iteration - self.best_iteration, run.iterations) >= settings.held_out_patience:
                verdict = "converged"  # past the held-out optimum (each model gets its patience): the rest would fit noise
            if searching and verdict != "continue":
                self._next_candidate(verdict)
                return
            if verdict == "converged" and self.held_out is not None and self.search is None \
                    and (position := self._search_position()) is not None:
                previous = self.model_name  # past the optimum; a later rung's strength is the data's to choose: now
                self._close_run("converged")
                self._switch_model(position, estimate=self.model.estimate)
                self.record_event("escalated", from_model=previous, to_model=self.model_name, because="strength search")
                return
            if verdict == "converged":
                self._finish("converged")
                return
            if verdict == "stalled":
                self._escalate_or_finish("stalled")
                return
        if self.search is not None and self.search.running:  # each candidate gets the iterations a task does
            if run.iterations >= (settings.max_iterations_per_model or settings.max_iterations):
                self._next_candidate("max_iterations")
        elif self.iteration >= settings.max_iterations:
            self._finish("max_iterations")
        elif settings.max_iterations_per_model and run.iterations >= settings.max_iterations_per_model:
            self._escalate_or_finish("max_iterations")

    def run_to_end(self) -> None:
        while not self.done:
            self.step()

    def escalate(self, reason: str) -> None:
        """Move to the next model now (a supervision decision, or a failed validation of a
        finished task, which then runs again); on the last model, finish as ``stalled``."""
        self.reason = reason
        if self.search is not None and self.search.running:  # a candidate of a strength search: on to the next
            self._next_candidate("escalated")
            return
        if self.done and self.can_escalate:
            self.status = "running"
        self._escalate_or_finish("stalled", stop="escalated")

    def regularize(self, reason: str) -> bool:
        """Go on with the next model of the ladder that regularises (skipping faster ones,
        which reach the same noise-fitted solution sooner), from the held-out rule's best
        iterate; a finished task runs again. False, and nothing changes, if none is left."""
        position = next((p for p in range(self.ladder_position + 1, len(self.models))
                         if load_model(self.models[p]).regularizes), None)
        if position is None:
            return False
        self.reason = reason
        previous = self.model_name
        self._close_run("stalled")
        self.status = "running"
        self._switch_model(position, estimate=self.model.estimate)
        self.record_event("escalated", from_model=previous, to_model=self.model_name, because="fitted noise")
        return True

    def diversify(self, model: str, reason: str) -> None:
        """Go on with ``model`` (another family, not on the ladder) from the current estimate,
        after the ladder is exhausted; a finished task runs again."""
        self.reason = reason
        self.models.append(model)
        self._close_run("stalled")
        self.status = "running"
        self._switch_model(len(self.models) - 1, estimate=self.model.estimate)
        self.record_event("diversified", model=model, reason=reason)

    def terminate(self, reason: str) -> None:
        """End the task now with status ``terminated``."""
        self.reason = reason
        self._finish("terminated")

    def fail(self, reason: str) -> None:
        """End the task now with status ``failed``: its model raised (``reason`` names the
        model, what it was doing and the error). Its estimate is not a result."""
        self.reason = reason
        if self.runs and self.runs[-1].stop == "running":
            self.runs[-1].stop = "failed"
        self.status = "failed"
        self.record_event("failed", model=self.model_name, reason=reason)

    def hand_back(self, reason: str) -> None:
        """Stop here so the task can go on elsewhere (from the checkpoint the caller took)."""
        self.handed_back = True
        self.reason = reason
        self.status = "terminated"
        self._close_run("rerouted")
        self.record_event("rerouted", model=self.model_name, reason=reason)

    def validate(self) -> list[str]:
        """Apply the task's validation rules to the estimate; record and return the failures."""
        rules = self.task.validation
        xp = self.backend.xp
        failures = []
        figures = self.held_out_figures()
        if figures is not None and (not figures.better_than_input() or figures.result > figures.input) \
                and self._fall_back_to_best_prediction():
            figures = self.held_out_figures()
        self.fitted_noise = figures is not None and not figures.better_than_input()
        if self.fitted_noise:
            in_object = "" if figures.object_significance is None else \
                f"; object error {_figure(figures.object_significance)} standard errors"
            failures.append(f"the result is no better than the input by the held-out counts (fit {figures.result:.4g} "
                            f"vs {figures.input:.4g}, {_figure(figures.significance)} standard errors; departure "
                            f"{_figure(figures.departure)} of the input's noise{in_object}): every model fitted the noise")
        elif figures is not None and self.done and self.status != "failed":
            self.guard = figures
            if self.task.convergence.refit_all_counts and not self.refitted:
                self._refit()
        if rules.require_finite and not bool(xp.all(xp.isfinite(self.estimate))):
            failures.append("estimate has non-finite values")
        lowest = float(xp.min(self.estimate))
        if rules.require_nonnegative and lowest < 0:
            failures.append(f"estimate has negative values (min {lowest:.3g})")
        if rules.max_misfit is not None:
            misfit = self.model.misfit()
            if misfit > rules.max_misfit:
                failures.append(f"misfit {misfit:.4g} above max_misfit {rules.max_misfit:.4g}")
        self.validation_failures = failures
        return failures

    def _fall_back_to_best_prediction(self) -> bool:
        """Where the iterate the object error chose fails the guard, or predicts the held-out
        counts worse than the input does: hold the one with the lowest held-out deviance
        instead (recomputed by :meth:`_replay`), whose prediction the guard's tests judge more
        sharply at low counts. False, and nothing changes, where there is none or it is the
        same iterate."""
        if self.best_deviance is None or self.search is not None or self.best_deviance[1] == self.best_iteration:
            return False
        deviance, iteration = self.best_deviance
        self._hold_replayed(iteration, self.problem)
        self.best_estimate, self.best_iteration, self.estimate_iteration = self.model.state()["estimate"], iteration, iteration
        self.best_held_out = self._score()
        self.best_deviance = None  # tried
        self.record_event("rolled_back", model=self.model_name, to_iteration=iteration, held_out=deviance,
                          because="the object error's choice is not shown better than the input")
        return True

    def _refit(self) -> None:
        """Compute the chosen iterate again on all the counts (``observed``): the same models,
        from the same starts, for the same iterations (:meth:`_replay`). The held-out counts
        chose the stopping point; they are data too, and the result uses them."""
        problem = {name: array for name, array in self.problem.items() if name != "held_out"}
        problem["image"] = self.problem["observed"]
        self._hold_replayed(self.best_iteration, problem)
        self.refitted = True
        self.record_event("refitted", model=self.model_name, iterations=self.best_iteration)

    def _hold_replayed(self, target: int, problem: dict[str, Array]) -> None:
        """Iterate ``target`` recomputed on ``problem`` (:meth:`_replay`), held by a fresh
        model of the one the task ended on, as after a rollback."""
        replayed = self._replay(target, problem)
        self.model = self._build(self.model_name, problem)
        self.model.start(replayed.state()["estimate"])

    def _replay(self, target: int, problem: dict[str, Array]) -> RefinementModel:
        """The model holding iterate ``target`` recomputed on ``problem``: back from
        ``target`` through the segment that made each estimate to the first start, then
        forward, each segment's model built afresh and started from its origin's estimate
        (``estimate``, as :meth:`_switch_model` hands it on)."""
        chain = []
        while target > 0:
            name, origin, first, strength = next(segment for segment in reversed(self.segments) if segment[2] < target)
            chain.append((name, strength, target - first))
            target = origin
        estimate, model = None, None
        for name, strength, steps in reversed(chain):
            model = self._build(name, problem, strength)
            model.start(estimate)
            for _ in range(steps):
                model.step()
            estimate = self.backend.xp.asarray(model.estimate, copy=True)
        return model

    def _build(self, name: str, problem: dict[str, Array], strength: float | None = None) -> RefinementModel:
        """Model ``name`` with the task's parameters for it, on ``problem`` (not started): with
        its strength parameter at ``strength`` if given, else at the search's (:meth:`_strength`)."""
        return load_model(name)(problem, self.backend, **self._params(name, strength))

    def _strength(self, name: str) -> float | None:
        """The strength model ``name`` is built with now where a search chooses it, else ``None``."""
        return self.search.strength if self.search is not None and self.search.model == name else None

    def _search_position(self) -> int | None:
        """The first later rung whose strength the data choose (:func:`~rqml_dask.strength.strength_grid`)."""
        return next((p for p in range(self.ladder_position + 1, len(self.models))
                     if strength_grid(load_model(self.models[p]), self.task.model_params.get(self.models[p], {}))), None)

    def _object_weights(self) -> Array:
        if self._weights is None:
            self._weights = self.model.object_weights(tuple(self.held_out.held.shape))
            if self._weights is None:
                raise ValueError(f"model {self.model_name!r} has no object_weights(): its strength cannot be chosen by the data")
        return self._weights

    def _begin_search(self, position: int, grid: tuple[float, ...], estimate: Array | None) -> None:
        """Start the search over the strengths ``grid`` of rung ``position``; its origin, the
        λ = 0 result each candidate must beat, is the held-out optimum so far (else ``estimate``)."""
        name = self.models[position]
        if self.held_out is None:
            raise ValueError(f"model {name!r}: a strength chosen by the data needs held-out counts "
                             "(photon-count data and convergence.held_out_fraction > 0)")
        if self.best_estimate is not None:
            origin, iteration, held_out = self.best_estimate, self.best_iteration, self.best_held_out
        elif estimate is not None:
            origin, iteration, held_out = self._keep(estimate), self.estimate_iteration, math.inf
        else:
            raise ValueError(f"model {name!r}: a strength chosen by the data needs a rung before it on the ladder "
                             "(its result is the unregularised one each strength must beat)")
        self.ladder_position = position
        self.search = StrengthSearch(name, grid, origin, iteration, held_out)
        self.record_event("strength_search", model=name, strengths=list(grid), from_iteration=iteration)
        self._start_candidate()

    def _start_candidate(self) -> None:
        """Run the search's next candidate from the model's own start (as it would run alone:
        from the unregularised result, a strong strength must first smooth its noise away),
        to its own held-out optimum."""
        search = self.search
        self.model = self._build(search.model, self.problem)
        self.model.start(None)
        self.segments.append((search.model, 0, self.iteration, search.strength))
        self.monitor = ConvergenceMonitor(self.task.convergence)
        self.runs.append(ModelRun(search.model, strength=search.strength))
        self.best_held_out, self.best_iteration, self.best_estimate = math.inf, self.iteration, None
        self.estimate_iteration = 0
        self._checkpoint_at_switch()

    def _take_candidate(self, stop: str) -> None:
        """End the running candidate: its held-out optimum becomes the search's best if it
        beats the origin by more than :data:`~rqml_dask.strength.SIGNIFICANCE` standard errors of
        the held-out noise and its object error is the lowest of those that do so far; a
        candidate whose object error is above the one before it ends the search."""
        search = self.search
        self._close_run(stop)
        following = search.index + 1
        if self.best_estimate is not None:
            weights = self._object_weights()
            candidate = self._build(search.model, self.problem)
            candidate.start(self.best_estimate)
            origin = self._build(search.model, self.problem, 0.0)
            origin.start(search.origin)
            prediction = candidate.prediction()
            error = self.best_held_out  # the candidate's iterates were scored by their object error (_score)
            significance = self.held_out.object_significance(prediction, origin.prediction(), weights)
            if significance <= -SIGNIFICANCE and error < search.best_error:
                search.best_strength, search.best_error, search.best_iteration = search.strength, error, self.best_iteration
                search.best_held_out, search.best_estimate = self.held_out.deviance(prediction), self.best_estimate
                search.significance = significance
            if error > search.last_error:  # past the best strength: the stronger ones do worse still
                following = len(search.strengths)
            search.last_error = error
        search.index = following

    def _next_candidate(self, stop: str) -> None:
        """After a candidate's end (``stop``): the next one, or the choice and the task's end."""
        self._take_candidate(stop)
        if self.search.running:
            self._start_candidate()
            return
        self._conclude_search()
        self._finish("converged")

    def _conclude_search(self) -> None:
        """Keep the search's best candidate (:meth:`_take_candidate`), else its origin
        (strength 0): the model then holds that iterate, as after a rollback."""
        search = self.search
        search.index = len(search.strengths)
        if search.best_estimate is not None:
            search.chosen = search.best_strength
            self.best_estimate, self.best_iteration, self.best_held_out = search.best_estimate, search.best_iteration, search.best_held_out
        else:
            search.chosen = 0.0
            self.best_estimate, self.best_iteration, self.best_held_out = search.origin, search.origin_iteration, search.origin_held_out
        self.model = self._build(search.model, self.problem)  # at the chosen strength
        self.model.start(self.best_estimate)
        self.estimate_iteration = self.best_iteration
        self.record_event("strength_chosen", model=search.model, strength=search.chosen, candidate=search.best_strength,
                          significance=search.significance)

    def _escalate_or_finish(self, status: Status, stop: str | None = None) -> None:
        if self.can_escalate:
            previous = self.model_name
            self._close_run(stop or status)
            self._switch_model(self.ladder_position + 1, estimate=self.model.estimate)
            self.record_event("escalated", from_model=previous, to_model=self.model_name, because=stop or status)
        else:
            self._finish(status)

    def record_event(self, kind: str, **payload) -> None:
        """Record a supervision event for the node to publish."""
        self.events.append({"kind": kind, "key": self.task.key, "task_id": self.task.task_id, "iteration": self.iteration, **payload})

    def _checkpoint_at_switch(self) -> None:
        """A model switch asks for a checkpoint where checkpoints are counted in iterations
        only; with ``every_seconds`` the interval already bounds what a crash can lose, and
        an early switch (a cheap rung's stall) adds no write."""
        settings = self.task.checkpoint
        if settings is not None and settings.every_seconds is None:
            self.checkpoint_reason = "model switch"

    def checkpoint_due(self) -> str | None:
        """Why a checkpoint should be taken now (per the task's settings), or ``None``."""
        settings = self.task.checkpoint
        if settings is None or not settings.enabled or self.done:
            return None
        if self.checkpoint_reason:
            return self.checkpoint_reason
        if settings.every_iterations and self.iteration - self.last_checkpoint_iteration >= settings.every_iterations:
            return "iterations"
        if settings.every_seconds and time.monotonic() - self.last_checkpoint_time >= settings.every_seconds:
            return "interval"
        return None

    def snapshot(self, reason: str) -> Snapshot:
        """The resumable state, kept as it is now (copied on the array backend unless the
        model's state is immutable) so the refinement goes on while a writer stores it."""
        self.checkpoint_reason = None
        self.last_checkpoint_iteration = self.iteration
        self.last_checkpoint_time = time.monotonic()
        self.checkpoints = thin([*self.checkpoints, self.iteration])
        arrays = {name: self._keep(array) for name, array in self.model.state().items()}
        if self.best_estimate is not None:  # kept already: the held-out rule's best iterate
            arrays[HELD_OUT_BEST] = self.best_estimate
        if self.search is not None:  # kept already too
            arrays[SEARCH_ORIGIN] = self.search.origin
            if self.search.best_estimate is not None:
                arrays[SEARCH_BEST] = self.search.best_estimate
        return Snapshot(
            task=self.task,
            iteration=self.iteration,
            model_config=ModelConfig(self.model_name, self.ladder_position, self._params(self.model_name)),
            arrays=arrays,
            supervision_state=self.supervision_state(),
            reason=reason,
            backend=self.backend,
        )

    def supervision_state(self) -> dict:
        """Everything but the model's arrays that a resumed refinement needs to go on as if
        uninterrupted (ladder history, heuristics' window), JSON/msgpack-friendly."""
        return {
            "task_key": self.task.key,
            "input_digest": self.task.input_digest,
            "models": list(self.models),
            "iteration": self.iteration,
            "runs": [asdict(run) for run in self.runs],
            "monitor": [list(point) for point in self.monitor.history],
            "monitor_held_out": list(self.monitor.held_out) if self.monitor.held_out is not None else None,
            "held_out_input": self.held_out_input,
            "held_out_best": [self.best_held_out, self.best_iteration] if self.best_estimate is not None else None,
            "best_deviance": list(self.best_deviance) if self.best_deviance is not None else None,
            "segments": [list(segment) for segment in self.segments],
            "search": self.search.state() if self.search is not None else None,
            "estimate_iteration": self.estimate_iteration,
            "guard": asdict(self.guard) if self.guard is not None else None,
            "refitted": self.refitted,
            "last_figures": asdict(self.last_figures) if self.last_figures else None,
            "trace": [astuple(point) for point in self.trace],
            "reason": self.reason,
            "status": self.status,
        }

    @classmethod
    def resume(
        cls, task: RQMLTask, problem: dict[str, Array], backend: ArrayBackend, checkpoint: TaskCheckpoint, arrays: dict
    ) -> Refinement:
        """Rebuild a refinement from a verified checkpoint and its artifact arrays (host).
        A checkpoint whose supervision state this release cannot read (another format) raises
        :class:`CheckpointError`, like a damaged one."""
        try:
            return cls._resume(task, problem, backend, checkpoint, arrays)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CheckpointError(f"checkpoint at iteration {checkpoint.iteration} is of a format this release "
                                  f"cannot read: {type(exc).__name__}: {exc}") from None

    @classmethod
    def _resume(
        cls, task: RQMLTask, problem: dict[str, Array], backend: ArrayBackend, checkpoint: TaskCheckpoint, arrays: dict
    ) -> Refinement:
        state = checkpoint.supervision_state
        position = checkpoint.model_config.ladder_position
        models = list(state.get("models", task.model_ladder))
        if state.get("task_key") != task.key or models[position] != checkpoint.model_config.model:
            raise CheckpointError(f"checkpoint at iteration {checkpoint.iteration} belongs to another task or ladder")
        if state.get("input_digest") != task.input_digest:
            raise CheckpointError(f"checkpoint at iteration {checkpoint.iteration} was made from other input data")
        refinement = cls(task, problem, backend)
        refinement.models = models
        arrays = {name: backend.asarray(array) for name, array in arrays.items()}
        best = arrays.pop(HELD_OUT_BEST, None)
        origin, search_best = arrays.pop(SEARCH_ORIGIN, None), arrays.pop(SEARCH_BEST, None)
        if state.get("search") is not None:
            refinement.search = StrengthSearch.from_state(state["search"], origin, search_best)
        refinement._switch_model(position, estimate=None)
        refinement.model.restore(arrays)
        if best is not None and state.get("held_out_best") is not None:
            refinement.best_held_out, refinement.best_iteration = float(state["held_out_best"][0]), int(state["held_out_best"][1])
            refinement.best_estimate = best
        refinement.runs = [ModelRun(**run) for run in state["runs"]]
        refinement.segments = [(str(n), int(o), int(f), None if not s or s[0] is None else float(s[0]))
                               for n, o, f, *s in state["segments"]]
        refinement.estimate_iteration = int(state["estimate_iteration"])
        refinement.guard = HeldOutFigures(**state["guard"]) if state["guard"] is not None else None
        refinement.refitted = bool(state["refitted"])
        refinement.monitor.history.extend((int(i), float(m)) for i, m in state["monitor"])
        if (held := state.get("monitor_held_out")) is not None:  # the score settling is judged against
            refinement.monitor.held_out = (int(held[0]), float(held[1]))
        refinement.held_out_input = state.get("held_out_input")
        if (deviance := state.get("best_deviance")) is not None:
            refinement.best_deviance = (float(deviance[0]), int(deviance[1]))
        refinement.last_figures = ConvergenceFigures(**state["last_figures"]) if state["last_figures"] else None
        refinement.trace = [TracePoint(*point) for point in state.get("trace", [])]
        refinement.iteration = checkpoint.iteration
        refinement.reason = state["reason"]
        refinement.status = state.get("status", "running")  # a final checkpoint resumes finished
        refinement.resumed_from = refinement.last_checkpoint_iteration = checkpoint.iteration
        refinement.checkpoint_reason = None
        return refinement

    def _switch_model(self, position: int, estimate: Array | None) -> None:
        name = self.models[position]
        if self.search is None and (grid := strength_grid(load_model(name), self.task.model_params.get(name, {}))):
            self._begin_search(position, grid, estimate)
            return
        model = self._build(name, self.problem)
        model.start(estimate)
        self.segments.append((name, self.estimate_iteration if estimate is not None else 0, self.iteration,
                              self._strength(name)))
        self.ladder_position = position
        self.model = model
        self.monitor = ConvergenceMonitor(self.task.convergence, escalates=self.can_escalate)
        self.runs.append(ModelRun(name))
        if position > 0:
            self._checkpoint_at_switch()

    def _close_run(self, stop: str) -> None:
        run = self.runs[-1]
        if run.stop != "running":
            return  # closed when the task finished; a later escalation keeps why it stopped
        run.stop = stop
        run.misfit = self.last_figures.misfit if self.last_figures else self.model.misfit()

    def _params(self, name: str, strength: float | None = None) -> dict:
        """The task's parameters for model ``name``, its strength parameter at ``strength``
        if given, else at the search's (:meth:`_strength`)."""
        params = dict(self.task.model_params.get(name, {}))
        strength = self._strength(name) if strength is None else strength
        if strength is not None:
            params[load_model(name).strength] = strength
        return params

    def _finish(self, status: Status) -> None:
        if self.search is not None and self.search.running:  # ended mid-search: choose among what ran
            self._take_candidate(status)
            self._conclude_search()
        self._close_run(status)
        self.status = status
        if self.best_estimate is not None and self.best_iteration != self.estimate_iteration:  # the held-out optimum
            self.model.start(self.best_estimate)
            self.estimate_iteration = self.best_iteration
            self.record_event("rolled_back", model=self.model_name, to_iteration=self.best_iteration,
                              held_out=self.best_held_out)
        if status in ("stalled", "terminated"):
            self.record_event(status, model=self.model_name, reason=self.reason)


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _relative_change(xp, current: Array, previous: Array) -> float:
    """``||current - previous|| / ||previous||`` (float64 sums, no whole-array temporary)."""
    change, denominator = sum_of_squares(xp, current, previous), sum_of_squares(xp, previous)
    if denominator > 0:
        return (change / denominator) ** 0.5
    # zero staying zero (an all-zero region) is settled; leaving zero (a solver's zero start) is a whole change,
    # not the divergence a non-finite figure means
    return 0.0 if change == 0 else 1.0
