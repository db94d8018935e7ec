"""The OpenVINO backend: both towers converted once, cached on disk, compiled for the CPU.

Why: on a CPU, OpenVINO's kernels run the SigLIP towers faster than PyTorch with
the same float32 results (INFERENCE_PRECISION_HINT f32: confidences within 1e-6
of the transformers reference), and far faster in bfloat16 on CPUs that have it
(AMX / AVX512-BF16). Weight-only int8 (NNCF `compress_weights`) halves the
weights' memory again.

What is converted: `get_image_features` and `get_text_features` of the loaded
float32 transformers model, traced by `openvino.convert_model` with dynamic
batch (and, for NaFlex, dynamic patch counts and padding masks). NaFlex's
position embeddings, resized to each image's patch grid, are computed outside the
graph by transformers' own code (`NaFlexPositions`) and fed in as an input.
Scoring stays in the engine (float64 dot products), so both backends share it.

The disk cache (`<cache root>/openvino/`) holds one folder per tower and *key*:
the key is everything that changes the converted graph (model fingerprint and
weights digest, family, tower, input names and shapes, weight format, and the
versions of OpenVINO, NNCF, torch and transformers). An entry is written into a
temporary folder and renamed into place under an exclusive lock, so concurrent
processes convert once and never see half an entry; a manifest with file sizes
and sampled digests, written last, tells a complete entry from a damaged one. A
damaged entry is named in a warning and rebuilt. Nothing here imports openvino
until a tower is first used, so importing the plugin stays cheap.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fileio import write_atomic
from .locks import locked
from .textcache import file_digest, key_digest, library_versions, weights_digest
from .versions import installed_version

__all__ = ["BACKENDS", "SUPPORTED_FAMILIES", "BackendChoice", "CacheEntryError", "ModelCache", "OpenVINOTowers",
           "choose_backend", "compile_config", "dtype_note", "quantization_reason", "unsupported", "versions"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "openvino")
SUBDIR = "openvino"
FORMAT = "2"  # 2: a sampled digest per file in the manifest; NaFlex takes position embeddings
# Families whose conversion tests/test_openvino.py checks against the transformers reference.
SUPPORTED_FAMILIES = ("siglip", "siglip2", "naflex")
DTYPE_HINTS = {"float32": "f32", "bfloat16": "bf16"}
# Measured on this project's 2-core CI machine, base shape, float32 (benchmarks/RESULTS.md).
TORCH_F32_COST = "PyTorch float32 runs the vision tower ~1.2-1.3x slower with the same scores"
CONVERT_S_PER_M_PARAMS = 0.1  # measured: so400m (~880M parameters, both towers) ~80 s, base ~12 s
_STALE_TMP_SECONDS = 3600.0


# --- choosing (pure) ---------------------------------------------------------------------------

@dataclass(frozen=True)
class BackendChoice:
    backend: str
    reason: str
    problem: str | None = None  # set when an explicit backend = "openvino" cannot be honoured


def unsupported(family: str, device: str, dtype: str, quantization: str, openvino: str | None,
                nncf: str | None) -> str | None:
    """Why OpenVINO cannot run this model and these settings (None: it can)."""
    install = 'install the `openvino` extra: pip install "visual-buffet-siglip[openvino]"'
    if openvino is None:
        return f"openvino is not installed; {install}"
    if device != "cpu":
        return f"this plugin runs OpenVINO on the CPU only (device is {device})"
    if family not in SUPPORTED_FAMILIES:
        return f"model family {family!r} has no verified OpenVINO conversion"
    if dtype not in ("auto", *DTYPE_HINTS):
        return f'dtype = "{dtype}" is not an OpenVINO CPU precision (use "float32" or "bfloat16")'
    if quantization == "4bit":
        return 'quantization = "4bit" runs through bitsandbytes on PyTorch only (OpenVINO offers "8bit")'
    if quantization == "8bit" and nncf is None:
        return f'quantization = "8bit" with OpenVINO needs nncf, which is not installed; {install}'
    return None


def choose_backend(setting: str, family: str, device: str, dtype: str, quantization: str,
                   openvino: str | None, nncf: str | None, params_m: int) -> BackendChoice:
    """The backend for these settings, with a reason that also says what the other choice costs."""
    problem = unsupported(family, device, dtype, quantization, openvino, nncf)
    convert = (f"the first run converts the model (~{max(5, round(params_m * CONVERT_S_PER_M_PARAMS))} s "
               "here), later runs load it from the cache in seconds")
    if setting == "torch":
        cost = (f"; OpenVINO {openvino} is installed and could run it faster ({TORCH_F32_COST})"
                if problem is None else "")
        return BackendChoice("torch", 'backend = "torch" set in config' + cost)
    if setting == "openvino":
        if problem is not None:
            return BackendChoice("torch", "", f'backend = "openvino": {problem}; set backend = "auto" or "torch"')
        return BackendChoice("openvino", f'backend = "openvino" set in config (OpenVINO {openvino}); {convert}')
    if problem is not None:
        return BackendChoice("torch", f"auto: PyTorch, because {problem}")
    return BackendChoice("openvino", f"auto: OpenVINO {openvino} on CPU, same float32 scores as PyTorch "
                                     f"and faster ({TORCH_F32_COST}); {convert}")


def quantization_reason(quantization: str, nncf: str | None, cpu_features: frozenset[str]) -> str:
    """Why the weights are (not) compressed when OpenVINO runs the model."""
    if quantization == "none":
        return "none: full weights (quantization only when set in config)"
    vnni = [f for f in ("amx_int8", "avx512_vnni", "avx_vnni") if f in cpu_features]
    speed = (f"this CPU has {', '.join(vnni)}" if vnni else
             "this CPU has no VNNI, so the int8 weights are widened before use: memory saved, little speed")
    return (f'quantization = "8bit" set in config: OpenVINO int8 weight compression (NNCF {nncf}, '
            f"asymmetric per-channel, activations in the dtype below); {speed}")


def dtype_note(dtype: str, native_bf16: bool) -> str:
    """What the dtype means for OpenVINO, appended to the plan's dtype reason."""
    if dtype == "bfloat16" and not native_bf16:
        return ("; OpenVINO: this CPU has no native bfloat16 (AMX / AVX512-BF16), so OpenVINO computes in "
                "float32 here: float32's speed and scores")
    if dtype == "bfloat16":
        return "; OpenVINO compiles the towers with the bf16 precision hint (AMX / AVX512-BF16 kernels)"
    return ("; OpenVINO compiles the towers with the f32 precision hint, so scores equal the reference "
            "(its own CPU default would be bf16 where the CPU has it)")


def compile_config(dtype: str) -> dict[str, str]:
    """OpenVINO CPU compile properties for the plan's dtype (f32 keeps results exact)."""
    return {"INFERENCE_PRECISION_HINT": DTYPE_HINTS.get(dtype, "f32")}


# convert_model traces with torch.jit.trace, which is not thread-safe: a second trace in another
# thread renames the first one's modules mid-trace and its sanity check fails. One at a time.
_TRACE_LOCK = threading.Lock()


# --- the on-disk cache -------------------------------------------------------------------------

class CacheEntryError(Exception):
    """A cache entry that cannot be trusted (missing files, wrong sizes or digests, foreign key)."""


class ModelCache:
    """Converted OpenVINO models under `<root>/openvino/<tower>-<hash>/`, process- and thread-safe."""

    def __init__(self, root: Path):
        self.folder = Path(root) / SUBDIR
        self._lock = threading.Lock()

    def entry(self, key: Mapping[str, Any]) -> Path:
        return self.folder / f"{key['tower']}-{key_digest(key)}"

    def get_or_build(self, key: Mapping[str, Any], build: Callable[[], Any]) -> Any:
        """The cached `ov.Model` for `key`, else `build()` it, save it and return it.

        An unwritable cache folder degrades to converting in memory, with a warning.
        """
        entry = self.entry(key)
        with contextlib.suppress(CacheEntryError):
            return self._read(entry, key)
        with self._lock:
            held = contextlib.ExitStack()
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                held.enter_context(locked(entry.with_suffix(".lock")))
            except OSError as exc:
                log.warning("OpenVINO model cache %s is not writable (%s); converting in memory for this "
                            "run (set cache_dir or VISUAL_BUFFET_SIGLIP_CACHE to a writable folder)",
                            self.folder, exc)
                return build()
            with held:
                try:  # another process may have finished it while we waited for the lock
                    return self._read(entry, key)
                except CacheEntryError as exc:
                    if entry.exists():
                        log.warning("OpenVINO model cache entry %s is unusable (%s); converting it again",
                                    entry, exc)
                model = build()
                try:
                    self._write(entry, key, model)
                    # what every later process runs: a freshly converted graph and its saved form can
                    # compile to kernels that differ in the last bit
                    return self._read(entry, key)
                except (OSError, CacheEntryError) as exc:
                    log.warning("cannot save the converted model to %s (%s); it will be converted again "
                                "next run", entry, exc)
                return model

    def _read(self, entry: Path, key: Mapping[str, Any]) -> Any:
        import openvino as ov

        try:
            manifest = json.loads((entry / "manifest.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CacheEntryError("no manifest") from None
        except (OSError, ValueError) as exc:
            raise CacheEntryError(f"bad manifest: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("key") != json.loads(json.dumps(dict(key))):
            raise CacheEntryError("its key does not match this model")
        try:
            for name, expected in manifest.get("files", {}).items():
                if file_digest(entry / name) != expected:
                    raise CacheEntryError(f"{name} is damaged or truncated")
            return ov.Core().read_model(str(entry / "model.xml"))
        except CacheEntryError:
            raise
        except Exception as exc:  # OSError, or OpenVINO refusing the IR
            raise CacheEntryError(f"{type(exc).__name__}: {exc}") from None

    def _write(self, entry: Path, key: Mapping[str, Any], model: Any) -> None:
        import openvino as ov

        temp = self.folder / f".{entry.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            temp.mkdir()
            ov.save_model(model, str(temp / "model.xml"), compress_to_fp16=False)
            files = {name: file_digest(temp / name) for name in ("model.xml", "model.bin")}
            write_atomic(temp / "manifest.json", json.dumps({"format": FORMAT, "key": dict(key), "files": files}))
            if entry.exists():
                shutil.rmtree(entry)
            os.replace(temp, entry)
        finally:
            shutil.rmtree(temp, ignore_errors=True)
        self._clean_stale_temps()

    def _clean_stale_temps(self) -> None:
        """Temp folders left by killed converters (never ones a live converter may still own)."""
        cutoff = time.time() - _STALE_TMP_SECONDS
        for temp in self.folder.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if temp.stat().st_mtime < cutoff:
                    shutil.rmtree(temp)


# --- running -----------------------------------------------------------------------------------

def versions() -> dict[str, str]:
    """Versions of the libraries that shape a converted graph: the label cache's, OpenVINO's and NNCF's."""
    import openvino

    return {**library_versions(), "openvino": openvino.__version__, "nncf": installed_version("nncf") or "-"}


class NaFlexPositions:
    """NaFlex's position embeddings resized to each image's patch grid, by transformers' own code.

    Why outside the converted graph: transformers splits each patch index into row and
    column with `floor(i / width)` in float32, and OpenVINO's CPU division is not
    correctly rounded (a reciprocal multiply), so some exact multiples of widths 41,
    47, 55, 61, ... land one row short and those patches take a neighbour's position
    (confidences 2e-3 off at max_num_patches = 1024). Computed here they are the
    reference's own; photos come in few aspect ratios, so grids are cached.
    """

    LIMIT = 16  # grids kept: so400m at 1,024 patches holds 4.7 MB each

    def __init__(self, embeddings: Any):
        self.embeddings = embeddings  # transformers' Siglip2VisionEmbeddings
        self._grids: dict[tuple[int, int, int], Any] = {}
        self._lock = threading.Lock()

    def __call__(self, spatial_shapes: Any, length: int) -> Any:
        """[batch, length, hidden] position embeddings for these (height, width) patch grids, padded to `length`."""
        import torch

        return torch.cat([self._grid(height, width, length) for height, width in spatial_shapes.tolist()])

    def _grid(self, height: int, width: int, length: int) -> Any:
        import torch

        key = (height, width, length)
        with self._lock, torch.no_grad():
            if key not in self._grids:
                if len(self._grids) >= self.LIMIT:
                    del self._grids[next(iter(self._grids))]  # the oldest
                side = self.embeddings.position_embedding_size
                table = self.embeddings.position_embedding.weight.reshape(side, side, -1)
                self._grids[key] = self.embeddings.resize_positional_embeddings(
                    table, torch.tensor([[height, width]]), max_length=length)
            return self._grids[key]


POSITIONS = "position_embeddings"  # the NaFlex vision graph's input in place of spatial_shapes


def _tower_module(model: Any, tower: str, names: Sequence[str]) -> Any:
    """An nn.Module whose positional inputs are `names`, returning the tower's pooled features."""
    import torch

    method = model.get_image_features if tower == "vision" else model.get_text_features

    class Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            inputs = dict(zip(names, args))
            positions = inputs.pop(POSITIONS, None)
            if positions is None:
                output = method(**inputs)
            else:
                with _positions_given(model.vision_model.embeddings, positions):
                    output = method(**inputs, spatial_shapes=torch.zeros((0, 2), dtype=torch.long))
            return output if isinstance(output, torch.Tensor) else output.pooler_output

    return Tower().eval()


@contextlib.contextmanager
def _positions_given(embeddings: Any, positions: Any) -> Iterator[None]:
    """While tracing: transformers' NaFlex embedding layer adds `positions` (an input) instead of resizing its own."""
    embeddings.resize_positional_embeddings = lambda *_args, **_kwargs: positions
    try:
        yield
    finally:
        del embeddings.resize_positional_embeddings


class OpenVINOTowers:
    """The loaded model's two towers, compiled by OpenVINO on first use of each."""

    def __init__(self, loaded: Any, cache_dir: Path):
        self.loaded = loaded
        self.cache = ModelCache(cache_dir)
        self._compiled: dict[str, tuple[Any, tuple[str, ...]]] = {}
        self._lock = threading.Lock()
        self._positions = (NaFlexPositions(loaded.model.vision_model.embeddings)
                           if loaded.info.family == "naflex" else None)

    @property
    def weight_format(self) -> str:
        return "int8_asym" if self.loaded.plan.quantization == "8bit" else "f32"

    def features(self, tower: str, inputs: Mapping[str, Any]) -> Any:
        """Pooled (un-normalised) features of `tower` for torch `inputs`, as a float32 torch tensor."""
        import torch

        inputs = self._graph_inputs(inputs)
        compiled, names = self._compiled_tower(tower, tuple(inputs))
        arrays = [inputs[name].detach().cpu().numpy() for name in names]
        output = compiled(arrays)[0]  # a view of the request's buffer, which the next call overwrites
        return torch.from_numpy(output.astype("float32", copy=True))

    def _graph_inputs(self, inputs: Mapping[str, Any]) -> Mapping[str, Any]:
        """What the converted graph takes: NaFlex's spatial shapes become their position embeddings."""
        if self._positions is None or "spatial_shapes" not in inputs:
            return inputs
        out = {name: value for name, value in inputs.items() if name != "spatial_shapes"}
        out[POSITIONS] = self._positions(inputs["spatial_shapes"], inputs["pixel_values"].shape[1])
        return out

    def _compiled_tower(self, tower: str, names: tuple[str, ...]) -> tuple[Any, tuple[str, ...]]:
        found = self._compiled.get(tower)
        if found is not None and found[1] == names:
            return found
        with self._lock:
            found = self._compiled.get(tower)
            if found is None or found[1] != names:
                found = (self._compile(tower, names), names)
                self._compiled[tower] = found
        return found

    def key(self, tower: str, names: Sequence[str]) -> dict[str, Any]:
        """Everything that changes this tower's converted graph (the disk cache's key)."""
        loaded = self.loaded
        return {"format": FORMAT, "tower": tower, "model": loaded.fingerprint,
                "weights": weights_digest(loaded.source), "family": loaded.info.family,
                "inputs": {name: _dynamic_shape(tower, name, loaded.info) for name in names},
                "weight_format": self.weight_format, **versions()}

    def _compile(self, tower: str, names: tuple[str, ...]) -> Any:
        import openvino as ov

        model = self.cache.get_or_build(self.key(tower, names), lambda: self._convert(tower, names))
        start = time.perf_counter()
        compiled = ov.Core().compile_model(model, "CPU", compile_config(self.loaded.plan.dtype))
        log.debug("compiled the OpenVINO %s tower in %.1f s", tower, time.perf_counter() - start)
        return compiled

    def _convert(self, tower: str, names: tuple[str, ...]) -> Any:
        """Trace the tower on a small example and convert it (tens of seconds for large models)."""
        import openvino as ov
        import torch

        loaded = self.loaded
        log.info("converting the %s tower of %s to OpenVINO (%s weights; first use only, cached) ...",
                 tower, loaded.info.id, self.weight_format)
        start = time.perf_counter()
        example = self._graph_inputs(_example_inputs(loaded, tower))
        with _TRACE_LOCK, torch.no_grad(), _quiet_tracing():
            model = ov.convert_model(_tower_module(loaded.model, tower, names),
                                     example_input=tuple(example[name] for name in names))
        if self.weight_format == "int8_asym":
            import nncf

            # NNCF logs tables to stdout and draws a progress bar there; stdout carries our results
            chatty = logging.getLogger("nncf")
            level = chatty.level
            chatty.setLevel(logging.WARNING)
            try:
                with contextlib.redirect_stdout(sys.stderr):
                    model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
            finally:
                chatty.setLevel(level)
        log.info("converted the %s tower in %.1f s", tower, time.perf_counter() - start)
        return model


def _dynamic_shape(tower: str, name: str, info: Any) -> str:
    """The input's shape as the converted graph accepts it (? = any size)."""
    if tower == "text":
        return "[?,64]"
    if info.family == "naflex":
        return {"pixel_values": "[?,?,?]", "pixel_attention_mask": "[?,?]", POSITIONS: "[?,?,?]"}.get(name, "?")
    return f"[?,3,{info.image_size},{info.image_size}]"


def _example_inputs(loaded: Any, tower: str) -> dict[str, Any]:
    """Processor output for two small inputs of different shapes: what tracing runs the tower on."""
    from PIL import Image

    from .config import MAX_LENGTH

    processor = loaded.processor
    if tower == "text":
        return dict(processor.tokenizer(["this is a photo of a dog.", "this is a photo of an old red car."],
                                        padding="max_length", max_length=MAX_LENGTH, truncation=True,
                                        return_tensors="pt"))
    pictures = [Image.new("RGB", (96, 48), (120, 30, 200)), Image.new("RGB", (40, 90), (10, 200, 60))]
    kwargs = {"max_num_patches": 64} if loaded.info.family == "naflex" else {}
    return dict(processor(images=pictures, return_tensors="pt", **kwargs))


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """torch.jit's tracer warnings say nothing a user can act on."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
