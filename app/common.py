"""What every tab shares: per-tab runs that can be cancelled, range checks, images for galleries and message
formatting. The session's model and data (a :class:`core.workspace.Workspace`) live in a ``gr.State`` made by
:func:`app.ui.build_app` and passed to every tab."""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import hashlib
import inspect
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import gradio as gr
import numpy as np
import torch

from core.data import BUILTIN_SOURCES
from core.data.calibration import folder_image_files
from core.errors import MAX_SEED, StudioError, check_seed
from core.eval import Cancelled
from core.gen import saved_sets
from core.records import write_replacing
from core.workspace import Workspace, fits_fashion_mnist

Value = TypeVar("Value")
ENGINE_THREADS_ENV = "OUROMAMBA_ENGINE_THREADS"


def _start_engine() -> None:
    """The engine thread's OpenMP threads: ``$OUROMAMBA_ENGINE_THREADS`` (app.py sets it to every core and gives
    every other thread one), else torch's default. ``torch.set_num_threads`` sets the calling thread's count and
    the one every thread takes on its first parallel op, which the engine must not hand on: so the engine takes
    its own first (a thread takes it once), then sets its count, and a passing thread sets the others' back to 1
    (tests/test_app.py checks the outcome in a fresh process)."""
    if not (threads := os.environ.get(ENGINE_THREADS_ENV)):
        return
    torch.get_num_threads()
    torch.set_num_threads(int(threads))
    others = threading.Thread(target=torch.set_num_threads, args=(1,))
    others.start()
    others.join()


class Engine:
    """The one thread that runs the jobs' torch work, one job after another (on 2 cores jobs side by side only slow
    each other down). OpenMP keeps a team of threads per thread that ran a parallel op, for that thread's life;
    with a second team alive (a Gradio worker thread that ran one job, idle, and another running the next) libgomp
    counts more threads than cores and puts its threads to sleep between ops, so the default model's many small
    ops ran 3–5× slower in the served app than in one process (docs/app.md has the measurements)."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ouromamba-engine",
                                            initializer=_start_engine)
        self._lock = threading.Lock()
        self._jobs = 0  # submitted, not finished

    def submit(self, work: Callable[[], Value]) -> tuple[Future[Value], bool]:
        """``work()`` queued on the engine in the caller's context variables (Gradio's progress bar finds its event
        through them), and whether it waits behind another job."""
        with self._lock:
            self._jobs += 1
            behind = self._jobs > 1
        future = self._executor.submit(contextvars.copy_context().run, work)
        future.add_done_callback(self._finished)
        return future, behind

    def _finished(self, _: Future) -> None:
        with self._lock:
            self._jobs -= 1


ENGINE = Engine()
WAITING = "Waiting for the job ahead of it (this tab's or another's): one job runs at a time"


@dataclass
class Run:
    """One job started from one browser tab; kept in that tab's ``gr.State`` so tabs never cancel
    each other's work."""

    cancel: threading.Event = field(default_factory=threading.Event)
    done: bool = False
    replaced: bool = False  # cancelled by a second Run press: the page belongs to the new run


class OpenRuns:
    """Each page's runs that have not finished, by Gradio session, so that closing or reloading the page cancels
    them: their results would show nowhere, and a closed page's Quantize would hold the engine, and every other
    page's jobs behind it, for a minute and a half."""

    def __init__(self) -> None:
        self._runs: dict[str, list[Run]] = {}
        self._lock = threading.Lock()

    def add(self, session: str, run: Run) -> None:
        with self._lock:
            self._runs[session] = [*(live for live in self._runs.get(session, []) if not live.done), run]

    def close(self, session: str) -> int:
        """Cancel the session's unfinished runs and forget the session; how many were cancelled."""
        with self._lock:
            runs = [run for run in self._runs.pop(session, []) if not run.done]
        for run in runs:
            run.cancel.set()
        return len(runs)


OPEN_RUNS = OpenRuns()


def arm(previous: Run | None, request: gr.Request | None = None) -> Run:
    """A fresh Run for this tab before its job is queued, so Cancel also works while it waits; pressing
    Run again replaces (cancels) the tab's previous run. Gradio passes the ``request``, whose session the run
    is filed under for :func:`close_session`."""
    if previous is not None:
        previous.replaced = not previous.done
        previous.cancel.set()
    run = Run()
    if request is not None and request.session_hash:
        OPEN_RUNS.add(request.session_hash, run)
    return run


def close_session(request: gr.Request) -> None:
    """Gradio's unload hook (the page was closed or reloaded, or lost its connection to the server): its runs
    are cancelled, each at its next step, or out of the engine's line if it was waiting."""
    if request.session_hash and (cancelled := OPEN_RUNS.close(request.session_hash)):
        logging.getLogger("ouromamba.app").info("page closed: %d job(s) cancelled", cancelled)


def cancel(run: Run | None) -> None:
    """Stop this tab's job at its next check; other tabs' jobs go on."""
    if run is None or run.done:
        gr.Info("Nothing to cancel: nothing is running in this tab.")
        return
    run.cancel.set()
    gr.Info("Cancelling: the job stops at its next step.")


def on_engine(work: Callable[[], Value], progress: gr.Progress | None = None,
              cancel: threading.Event | None = None) -> Value:
    """``work()`` on :data:`ENGINE`, the caller waiting for it: ``progress`` says so while another job is ahead
    (rather than a bar that does not move), and ``cancel`` (the tab's) set meanwhile takes it out of the line
    rather than when its turn comes. A job hands over its torch work once its inputs are checked and its cache
    missed, so that a refused input or an answer it already has never waits behind another tab's job."""
    future, behind = ENGINE.submit(work)
    if behind and progress is not None:
        progress(0, desc=WAITING)
    while cancel is not None and not future.running() and not future.done():
        if cancel.wait(0.1):
            leave_the_line(future)
    return future.result()


def leave_the_line(future: Future) -> None:
    """Take a job whose Cancel was pressed out of the engine's line, with the one line that says so; a job that
    has started meanwhile goes on, to stop at its own next check."""
    if future.cancel():
        raise Cancelled("cancelled while it waited for the job ahead of it")


def wire_run(run_button: gr.Button, cancel_button: gr.Button, run_state: gr.State, job, inputs: list,
             outputs: list, api_name: str, **queueing: object) -> None:
    """Run arms a fresh :class:`Run` (instant, never queued), then queues ``job(*inputs, run)``; Cancel sets
    the tab's event. A second Run while a job runs cancels it and runs the job again with the new inputs
    (``trigger_mode="always_last"``: gradio's default dropped the second trigger, so both runs were lost). The
    job follows the queue's default concurrency limit (set where the app is launched) unless ``queueing``
    (``concurrency_limit``, ``concurrency_id``) says otherwise; its torch work goes to the engine (``on_engine``)."""
    run_button.click(arm, run_state, run_state, concurrency_limit=None, api_visibility="private").then(
        guarded(job), [*inputs, run_state], outputs, api_name=api_name, trigger_mode="always_last", **queueing)
    cancel_button.click(cancel, run_state, None, concurrency_limit=None, api_visibility="private")


def run_of(args: tuple) -> Run | None:
    """The :class:`Run` among a job's arguments (Gradio passes the ``gr.Progress`` after it), or None (an API
    call's job gets None for it)."""
    return next((arg for arg in args if isinstance(arg, Run)), None)


def guarded(job: Callable) -> Callable:
    """``job`` (a function or a generator) with what escapes it turned into one line in the page: a
    :class:`StudioError` as it is, anything else (a bug) named with the server log's traceback behind it. What
    the tab shows stays as it was. However it ends, its :class:`Run` is marked done, so that Cancel after a refused
    input says there is nothing to cancel. The Run is found among the arguments wherever it sits: Gradio passes a
    job's ``gr.Progress`` after it, last (looking only at the last argument found no Run in any served job, so a
    run replaced by a second Run press showed its "Stopped" under the new run's progress)."""

    @contextlib.contextmanager
    def reported(args: tuple) -> Iterator[None]:
        try:
            yield
        except gr.Error:
            raise
        except StudioError as err:
            raise gr.Error(str(err)) from err
        except Exception as err:
            logging.getLogger("ouromamba.app").exception("%s failed", job.__name__)
            raise gr.Error(f"unexpected {type(err).__name__} ({err}); what the tab showed is kept, and the server "
                           "log has the traceback: please report it") from err
        finally:
            if (run := run_of(args)) is not None:
                run.done = True

    def shown(args: tuple, update: object) -> object:
        """``update``, or nothing at all for a run a second Run press replaced: its 'Stopped' would sit under
        the new run's progress."""
        if (run := run_of(args)) is None or not run.replaced:
            return update
        return tuple(gr.skip() for _ in update) if isinstance(update, tuple) else gr.skip()

    if inspect.isgeneratorfunction(job):
        @functools.wraps(job)
        def generator(*args, **kwargs):
            with reported(args):
                for update in job(*args, **kwargs):
                    yield shown(args, update)
        return generator

    @functools.wraps(job)
    def function(*args, **kwargs):
        with reported(args):
            return shown(args, job(*args, **kwargs))
    return function


class RecentResults(Generic[Value]):
    """Finished jobs by configuration, shared by every session of the app, forgetting the least recently used
    beyond ``max_items`` entries or ``max_bytes`` (as ``size`` counts them). A demo server runs for days and
    every configuration anyone tries would otherwise stay in memory (a Vim-T activation capture is over a GB).
    The newest entry is kept even when it alone is over ``max_bytes``: it is what its session is looking at.
    Jobs finish on Gradio's worker threads, so every access holds a lock."""

    def __init__(self, max_items: int, max_bytes: int | None = None, size: Callable[[Value], int] = lambda _: 0):
        self.max_items, self.max_bytes, self.size = max_items, max_bytes, size
        self._entries: OrderedDict[Hashable, Value] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Value | None:
        """The entry, now the most recently used, or None when it was never made or has been forgotten."""
        with self._lock:
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
            return self._entries[key]

    def put(self, key: Hashable, value: Value) -> Value:
        """Keep ``value`` as the most recent entry, forget the oldest ones beyond the limits; returns ``value``."""
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > 1 and (len(self._entries) > self.max_items or self._over_bytes()):
                self._entries.popitem(last=False)
        return value

    def _over_bytes(self) -> bool:
        return self.max_bytes is not None and sum(map(self.size, self._entries.values())) > self.max_bytes

    def __len__(self) -> int:
        return len(self._entries)


REPOSITORY = Path(__file__).resolve().parent.parent
SETS_DIR_ENV = "OUROMAMBA_SETS_DIR"
COMMITTED_SETS = REPOSITORY / "results" / "gen" / "sets"  # the evidence sets (results/gen/README.md)


def sets_dir() -> Path:
    """Where Synthesize saves its sets for Quantize: ``$OUROMAMBA_SETS_DIR``, else ``results/app_sets``."""
    return Path(os.environ.get(SETS_DIR_ENV) or REPOSITORY / "results" / "app_sets")


def calibration_choices() -> list[str]:
    """The built-in sources, then every saved set: this session's (Synthesize) and the committed evidence sets."""
    return [*BUILTIN_SOURCES, *(str(folder) for folder in saved_sets(sets_dir(), COMMITTED_SETS))]


def default_calibration(workspace: Workspace) -> str:
    """Real images where there are real calibration images for the model (Fashion-MNIST's), else noise."""
    return "real" if fits_fashion_mnist(workspace.model.cfg) else "noise"


def calibration_dropdown(workspace: Workspace, **options) -> gr.Dropdown:
    """A calibration-source box: real, noise, a set saved by Synthesize, or a typed folder of images; sets saved
    since the page loaded appear when it is opened."""
    box = gr.Dropdown(calibration_choices(), value=default_calibration(workspace), allow_custom_value=True,
                      **options)
    box.focus(lambda: gr.update(choices=calibration_choices()), None, box, api_visibility="private")
    return box


def download_file(folder: Path, stem: str, suffix: str, settings: object, text: str) -> Path:
    """``text`` saved for the page to download as ``folder/<stem>_<digest of settings><suffix>``: one file per
    distinct result, whatever its date (replaced whole: the page may be fetching the one the same result wrote
    before)."""
    digest = hashlib.sha256(repr(settings).encode()).hexdigest()[:12]
    return write_replacing(folder / f"{stem}_{digest}{suffix}", text)


def typed_path(text: str | None) -> str:
    """A path typed into a box, as a shell would read it: surrounding spaces dropped and ``~`` expanded (it
    names this server's files; '' when nothing was typed)."""
    return os.path.expanduser(text.strip()) if text and text.strip() else ""


def calibration_source(text: str | None) -> str:
    """The calibration source a box holds (:func:`typed_path`), or one line asking for one."""
    if not (source := typed_path(text)):
        raise StudioError("choose a calibration source: real, noise, or a folder of images")
    return source


def count_for_source(source: str | None, count: float | None) -> int | dict:
    """The calibration-count box after a source is picked: lowered to the size of a smaller folder (a set of 16
    from Synthesize against the default 128: the engine refuses to calibrate on more images than a folder
    holds), with a note; unchanged otherwise."""
    path = typed_path(source)
    if source in BUILTIN_SOURCES or not path or not Path(path).is_dir() or count is None:
        return gr.skip()
    folder = Path(path)
    size = len(folder_image_files(folder))
    if not 0 < size < count:
        return gr.skip()
    gr.Info(f"{folder.name} holds {size} images: calibration images set to {size}.")
    return size


GALLERY_SIZE = 112  # 28×28 images shown 4× as 112×112, nearest neighbour: every pixel stays visible


def zoom(pixels: np.ndarray) -> np.ndarray:
    """A small image enlarged for a gallery without blurring its pixels (images of 112 px and more as they are)."""
    factor = max(1, GALLERY_SIZE // pixels.shape[0])
    return pixels.repeat(factor, axis=0).repeat(factor, axis=1)


def clamped(slider: gr.Slider) -> gr.Slider:
    """``slider`` clamping a typed value into its range, as dragging already does: for live views (the layer of
    a figure). Gradio refuses an out-of-range value with an error that replaces the figure the slider drives,
    and the browser's own clamping afterwards fires no event to draw it again. The instance's ``preprocess`` is
    replaced rather than the class subclassed: gradio writes a .pyi stub beside every Component subclass."""
    refuse = slider.preprocess

    def preprocess(payload: float) -> float:
        return refuse(min(max(payload, slider.minimum), slider.maximum))

    slider.preprocess = preprocess
    return slider


def slider_top(last: int, first: int = 0) -> int:
    """A slider's maximum for the values first..last: gradio wants maximum > minimum, so a one-layer model's
    slider still offers 0..1, and the job says that 1 is out of range."""
    return max(last, first + 1)


def shared_state(value: object) -> gr.State:
    """A ``gr.State`` whose default ``value`` every new session shares as is (a Workspace: its ``__deepcopy__`` is
    itself). Gradio builds each new session's config with ``dataclasses.asdict`` of a dataclass default, which
    deep-copies its fields (the model, the images) only to drop the value: wasted work, and it raises while a job
    holds the model's autograd graph (OuroMamba-Gen), losing a freshly opened page's first click."""
    state = gr.State(value)

    def get_config() -> dict:
        bare = copy.copy(state)
        bare.value = None
        return gr.State.get_config(bare)

    state.get_config = get_config
    return state


def _typed(value: float) -> str:
    """A typed number as the person wrote it, near enough: 257 rather than 257.0, 1e+30 rather than its 31 digits."""
    return f"{int(value)}" if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def in_range(name: str, value: float | None, low: float, high: float) -> float:
    """``value`` when it lies in [low, high], else a one-line :class:`StudioError` that names the setting and its
    range: typed numbers reach the job unchecked, and the tab's status line says what is wrong."""
    if value is None or not low <= value <= high:
        typed = "nothing" if value is None else _typed(value)
        raise StudioError(f"{name} must be from {low:,g} to {high:,g} (got {typed})")
    return value


def whole_in_range(name: str, value: float | None, low: int, high: int) -> int:
    """``value`` as an int when it is a whole number in [low, high], else one line naming the setting: counts
    are typed into number boxes that do not round (gradio's precision=0 would turn 1.5 into 2 silently)."""
    in_range(name, value, low, high)
    if not float(value).is_integer():
        raise StudioError(f"{name} must be a whole number from {low:,} to {high:,} (got {value:g})")
    return int(value)


K_RANGE = (0.5, 8)  # the outlier threshold k, in standard deviations, wherever a tab takes it


def seed_of(value: float | None) -> int:
    """A seed typed into a number box, checked (``core.errors.check_seed``): one line when it is missing,
    fractional or out of range."""
    if value is None:
        raise StudioError("the seed needs a value")
    if not float(value).is_integer():
        raise StudioError(f"the seed must be a whole number (got {value})")
    return check_seed(int(value) if abs(value) <= MAX_SEED else value)  # 1e30 is refused as 1e+30, not 31 digits


def error(message: object) -> str:
    """The status line of a refused input. An exception's text is plain (the engine writes no Markdown), so its
    asterisks, in site patterns like ``layers.0.*``, are escaped rather than read as emphasis."""
    text = str(message).replace("*", "\\*") if isinstance(message, Exception) else message
    return f"**Error:** {text}"


def stopped(message: object) -> str:
    return f"**Stopped:** {message}."


def cell(value: object) -> str:
    """A table cell: '—' for a missing value, and pipes escaped so they cannot split the row."""
    return "—" if value is None else str(value).replace("|", "\\|")
