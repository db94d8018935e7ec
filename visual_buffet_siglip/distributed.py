"""Ray Data batch tagging: the same SiglipTagger, settings, label cache and output contract, scaled out.

`tag_dataset` turns a Ray Dataset of image paths (or the `{path, bytes}` rows of
`ray.data.read_binary_files(..., include_paths=True)`) into a Dataset of result
rows. Each Ray actor builds one `SiglipTagger` (one model load, labels encoded
once or read from the shared disk cache) and decodes the images itself, so a bad
file becomes an error row exactly as on one machine. `RayTagger` wraps it in the
local tagger's `iter_tag` interface, so the CLI feeds the same output sinks.

Ray is an optional extra: importing this module does not import it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import ModelSettings, Settings, tagger_parts
from .errors import ConfigError, ModelLoadError, UsageError
from .images import describe
from .records import Record, error_record

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

    from .engine import ImageEmbedding
    from .vocabulary import TagOptions

log = logging.getLogger(__name__)

EXTRA_HINT = "install the ray extra: pip install 'visual-buffet-siglip[ray]'"
ROWS_PER_CALL = 32  # rows handed to an actor per call; the tagger batches and pipelines inside it
CPUS_PER_CPU_ACTOR = 4  # default reservation of a CPU-only actor (torch runs that many threads)
# What actors must see as the driver does: the label-cache folder and the offline switch.
FORWARDED_ENV = ("VISUAL_BUFFET_SIGLIP_CACHE", "HF_HUB_OFFLINE")


def import_ray() -> Any:
    """`ray` with Ray Data, or a usage error naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401 - the `data` part of the extra
    except ImportError:
        raise UsageError(f"Ray is not installed; {EXTRA_HINT}") from None
    return ray


# --- result rows (Arrow) <-> output-contract records -------------------------------------------

def result_schema(embeddings: bool = False) -> pa.Schema:
    """The stable Arrow schema of result rows; ok rows have null error_*, error rows null model/version."""
    import pyarrow as pa

    fields = [
        pa.field("path", pa.string(), nullable=False),
        pa.field("tags", pa.list_(pa.struct([pa.field("label", pa.string(), nullable=False),
                                             pa.field("confidence", pa.float64(), nullable=False)])),
                 nullable=False),
        pa.field("model", pa.string()),
        pa.field("version", pa.string()),
        pa.field("inference_time_ms", pa.float64()),
        pa.field("error_type", pa.string()),
        pa.field("error_message", pa.string()),
    ]
    if embeddings:
        fields.append(pa.field("embedding", pa.list_(pa.float32())))
    return pa.schema(fields)


def record_to_row(path: str, record: Record, vector: Any = None) -> dict[str, Any]:
    """One output-contract record (plus its path) as a flat row of `result_schema`."""
    row: dict[str, Any] = {"path": arrow_text(path), "tags": list(record["tags"]), "model": None, "version": None,
                           "inference_time_ms": None, "error_type": None, "error_message": None}
    if "error" in record:
        row.update(error_type=record["error"]["type"], error_message=arrow_text(record["error"]["message"]))
    else:
        row.update(model=record["model"], version=record["version"], inference_time_ms=record["inference_time_ms"])
    row["embedding"] = None if vector is None else vector.tolist()
    return row


def arrow_text(text: str) -> str:
    """`text` as valid UTF-8 for Arrow: bytes of a file name that is not UTF-8 (old archives) become \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def row_to_record(row: Mapping[str, Any]) -> Record:
    """The exact output-contract record of a result row (no path, no null keys)."""
    if row["error_type"] is not None:
        return error_record(row["error_type"], row["error_message"])
    return {"tags": [{"label": t["label"], "confidence": float(t["confidence"])} for t in row["tags"]],
            "model": row["model"], "version": row["version"],
            "inference_time_ms": float(row["inference_time_ms"])}


def renamed(record: Record, old: str, new: str) -> Record:
    """`record` with an error message that starts with the image's name `old` naming it `new` instead.

    Actors read bytes or absolute paths; messages must name the image as the user did.
    """
    if old == new or "error" not in record or not record["error"]["message"].startswith(old):
        return record
    return error_record(record["error"]["type"], new + record["error"]["message"][len(old):])


class ParquetSink:
    """Records to one Parquet file in `result_schema`, in input order, a row group at a time."""

    def __init__(self, path: str, rows_per_group: int = 1024):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UsageError(f"--format parquet needs pyarrow; {EXTRA_HINT}") from None
        self.writer = pq.ParquetWriter(path, result_schema())
        self.rows: list[dict[str, Any]] = []
        self.rows_per_group = rows_per_group

    def write(self, path: str, item: ImageEmbedding | None, record: Record) -> None:
        self.rows.append(record_to_row(path, record))
        if len(self.rows) >= self.rows_per_group:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.writer.schema))
            self.rows = []

    def close(self) -> None:
        self._flush()
        self.writer.close()


# --- the Ray Data stage ------------------------------------------------------------------------

class TagBatches:
    """Ray Data callable class: one tagger per actor, built once, then batches of rows to result rows.

    Input columns: `path` (str, or binary for any file name), optionally
    `bytes` (the file's content, read by Ray); other columns pass through.
    Output: `result_schema` + pass-through.
    """

    def __init__(self, settings: Mapping[str, Any], embeddings: bool = False, vocabulary: str | None = None):
        from .engine import SiglipTagger
        from .vocabulary import parse_vocabulary

        parsed = Settings.from_mapping(settings)
        self.tagger = SiglipTagger(parsed.model_settings)
        self.options = parsed.options
        if vocabulary is not None:  # the labels' own thresholds and keyword paths travel as vocabulary text
            self.options = dataclasses.replace(self.options, vocabulary=parse_vocabulary(vocabulary))
        self.tagger.embed_texts(self.options.labels)  # loads the model, encodes (or reads) the labels
        self.embeddings = embeddings

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        if "path" not in batch.column_names:
            raise ValueError(f"tag_dataset needs a 'path' column (got {batch.column_names}); build the dataset "
                             "with ray.data.from_items([{'path': p} ...]) or "
                             "ray.data.read_binary_files(..., include_paths=True)")
        paths = [os.fsdecode(p) for p in batch.column("path").to_pylist()]  # binary paths: any file name
        blobs = batch.column("bytes").to_pylist() if "bytes" in batch.column_names else [None] * len(paths)
        sources = [path if blob is None else blob for path, blob in zip(paths, blobs)]
        rows = []
        for item, record in self.tagger.iter_tag(sources, options=self.options):
            path = paths[item.index]
            record = renamed(record, describe(item.source), path)
            rows.append(record_to_row(path, record, item.vector if self.embeddings else None))
        schema = result_schema(self.embeddings)
        table = pa.Table.from_pylist(rows, schema=schema)
        for name in batch.column_names:
            if name not in schema.names and name != "bytes":
                table = table.append_column(batch.schema.field(name), batch.column(name))
        return table


@dataclass(frozen=True)
class ActorPlan:
    """How many tagging actors and what each reserves, with a reason for each choice."""

    actors: int
    num_cpus: float
    num_gpus: float
    reasons: Mapping[str, str]


def plan_actors(nodes: Sequence[Mapping[str, float]], device: str, *, actors: int | None = None,
                num_cpus: float | None = None, num_gpus: float | None = None) -> ActorPlan:
    """Actor count and per-actor resources from the cluster's nodes, the `device` setting and explicit values.

    Pure: `nodes` are the alive nodes' resource totals ({"CPU": 16, "GPU": 2, ...}).
    GPU actors take one GPU each (one per GPU in the cluster); CPU actors share
    the CPUs, keeping one free so Ray's read and write tasks can run beside them
    (a fixed pool that holds every CPU starves `read_binary_files`).
    """
    for name, value in (("actors", actors), ("num_cpus", num_cpus), ("num_gpus", num_gpus)):
        if value is not None and (value <= 0 if name == "actors" else value < 0):
            raise ConfigError(f"{name} = {value!r}: expected a number {'>= 1' if name == 'actors' else '>= 0'}")
    cpus = sum(node.get("CPU", 0.0) for node in nodes)
    gpus = sum(node.get("GPU", 0.0) for node in nodes)
    biggest = max((node.get("CPU", 0.0) for node in nodes), default=0.0)
    reasons: dict[str, str] = {}
    if num_gpus is not None:
        reasons["num_gpus"] = f"{num_gpus:g} GPU(s) per actor, as requested"
    elif device.startswith("cuda") or (device == "auto" and gpus > 0):
        if gpus == 0:
            raise ConfigError(f"device = {device!r}: the Ray cluster has no GPUs; set device = \"auto\" or \"cpu\"")
        num_gpus = 1.0
        reasons["num_gpus"] = f"device = {device!r} and the cluster has {gpus:g} GPU(s): one per actor"
    else:
        num_gpus = 0.0
        reasons["num_gpus"] = (f"device = {device!r}: CPU actors" if device != "auto"
                               else "auto: the cluster has no GPUs, so CPU actors")
    if num_gpus > 0:
        if actors is None:
            actors = max(1, int(gpus // num_gpus))
            reasons["actors"] = f"{gpus:g} GPU(s) / {num_gpus:g} per actor"
        if num_cpus is None:
            num_cpus = 1.0
            reasons["num_cpus"] = "1 CPU per GPU actor (decoding threads are not bounded by the reservation)"
    spare = max(cpus - 1.0, 0.0) or cpus  # one CPU left for Ray's own tasks, unless there is only one
    if num_cpus is None:
        if actors is None:
            num_cpus = float(max(1, min(CPUS_PER_CPU_ACTOR, int(spare))))
            reasons["num_cpus"] = (f"{num_cpus:g} CPU(s) per actor: torch runs that many threads; "
                                   "one CPU stays free for Ray's read tasks")
        else:
            num_cpus = min(spare / actors, biggest)
            reasons["num_cpus"] = (f"{cpus:g} CPUs, one kept free for Ray's read tasks, shared by "
                                   f"{actors} actor(s); torch runs {max(1, int(num_cpus))} thread(s) each")
    if actors is None:
        actors = max(1, int(spare // num_cpus)) if num_cpus else 1
        reasons["actors"] = f"{spare:g} usable CPUs / {num_cpus:g} per actor"
    reasons.setdefault("actors", f"{actors} actor(s), as requested")
    reasons.setdefault("num_cpus", f"{num_cpus:g} CPU(s) per actor, as requested")
    return ActorPlan(actors=int(actors), num_cpus=float(num_cpus), num_gpus=float(num_gpus),
                     reasons={k: reasons[k] for k in ("actors", "num_cpus", "num_gpus")})


def actor_settings(settings: Settings) -> dict[str, Any]:
    """Settings as a plain mapping an actor on any node can rebuild: the labels travel, not the labels file.

    A `cuda:N` device becomes `cuda`: Ray gives each actor its own GPU(s) as the only visible ones.
    """
    mapping = settings.to_mapping()
    mapping.pop("labels_file", None)
    mapping["labels"] = list(settings.options.labels)
    if mapping["device"].startswith("cuda:"):
        mapping["device"] = "cuda"
    return mapping


def tag_dataset(dataset: ray.data.Dataset, settings: Settings | Mapping[str, Any] | None = None, *,
                actors: int | None = None, num_cpus: float | None = None, num_gpus: float | None = None,
                batch_size: int = ROWS_PER_CALL, embeddings: bool = False,
                options: TagOptions | None = None) -> ray.data.Dataset:
    """Tag every image of `dataset` on Ray actors; returns a lazy Dataset of result rows.

    `dataset` has a `path` column (read by the actors: local or shared storage)
    or `path` + `bytes` (from `read_binary_files(..., include_paths=True)`, e.g.
    on object storage). Rows follow `result_schema(embeddings)`, other input
    columns pass through; `row_to_record` gives the output-contract record.
    Actor count and resources come from `plan_actors` unless given. `options`
    (default: the settings') select the tags, exactly as a local run would.
    """
    from .vocabulary import format_vocabulary

    ray = import_ray()
    if not isinstance(settings, Settings):
        settings = Settings.from_mapping(settings or {})
    if options is None:
        options = settings.options
    mapping = {**actor_settings(settings), "labels": list(options.labels),
               "confidence_threshold": options.confidence_threshold, "max_tags": options.max_tags}
    if not ray.is_initialized():
        ray.init()
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    shape = plan_actors(nodes, settings.model_settings.device, actors=actors, num_cpus=num_cpus, num_gpus=num_gpus)
    log.info("Ray: %d actor(s), %g CPU and %g GPU each (%s)", shape.actors, shape.num_cpus, shape.num_gpus,
             "; ".join(f"{k}: {v}" for k, v in shape.reasons.items()))
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    actor_env: dict[str, Any] = {"runtime_env": {"env_vars": env}} if env else {}
    return dataset.map_batches(
        TagBatches, fn_constructor_kwargs={"settings": mapping, "embeddings": embeddings,
                                           "vocabulary": format_vocabulary(options.vocabulary)},
        batch_size=batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=shape.actors),
        num_cpus=shape.num_cpus, num_gpus=shape.num_gpus,
        **actor_env)


# --- the CLI's view: SiglipTagger.iter_tag on Ray ----------------------------------------------

class RayTagger:
    """`iter_tag` over a Ray cluster: the local tagger's records, in input order, for the CLI's sinks.

    Connects on first use (`address` as `ray.init` takes it; None starts a local
    instance unless RAY_ADDRESS names a cluster) and disconnects in `close`.
    """

    def __init__(self, settings: ModelSettings | Settings, *, address: str | None = None, actors: int | None = None,
                 verbose: bool = False):
        self._ray = import_ray()
        self.settings, self.default_options = tagger_parts(settings)
        self.address, self.actors, self.verbose = address, actors, verbose
        self._started = False

    def __enter__(self) -> RayTagger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Shut down the Ray connection this tagger opened (an existing one is left alone)."""
        if self._started:
            self._ray.shutdown()
            self._started = False

    def _connect(self) -> None:
        ray = self._ray
        if ray.is_initialized():
            return
        if not self.verbose:  # Ray Data's progress log would interleave with our progress bar
            ray.data.DataContext.get_current().enable_progress_bars = False
            logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # failures arrive as exceptions
        ray.init(address=self.address, include_dashboard=False, log_to_driver=self.verbose,
                 logging_level=logging.INFO if self.verbose else logging.WARNING)
        self._started = True

    def iter_tag(self, images: Sequence[str], options: TagOptions | None = None, *,
                 labels: Sequence[str] | None = None, threshold: float | None = None, max_tags: int | None = None
                 ) -> Iterator[tuple[ImageEmbedding, Record]]:
        """(embedding, result record) per image path, in input order, as `SiglipTagger.iter_tag` gives them."""
        from .engine import ImageEmbedding

        if options is None:
            options = self.default_options.override(labels=labels, threshold=threshold, max_tags=max_tags)
        self._connect()
        dataset = self._ray.data.from_items([{"index": i, "path": os.fsencode(os.path.abspath(p))}
                                             for i, p in enumerate(images)])
        results = tag_dataset(dataset, Settings(self.settings, options), actors=self.actors, embeddings=True)
        try:
            for row in in_input_order(results.iter_rows()):
                name = images[row["index"]]
                record = renamed(row_to_record(row), row["path"], name)
                vector = None if row["embedding"] is None else _float32(row["embedding"])
                if "error" in record:
                    item = ImageEmbedding(row["index"], name, vector, record["error"], 0.0)
                else:
                    item = ImageEmbedding(row["index"], name, vector, None, record["inference_time_ms"])
                yield item, record
        except self._ray.exceptions.ActorDiedError as exc:
            if not exc.actor_init_failed:
                raise
            raise ModelLoadError(f"a Ray actor could not set up the tagger: {_root_cause(str(exc))}") from None


def parquet_sink(output: str | None) -> ParquetSink:
    """The `tag --format parquet` sink; Parquet is binary, so it needs a file."""
    if not output:
        raise UsageError("--format parquet needs --output FILE")
    return ParquetSink(output)


def in_input_order(rows: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """Rows with an `index` column (0..n-1, any order) re-emitted in index order as soon as possible."""
    waiting: dict[int, Mapping[str, Any]] = {}
    expected = 0
    for row in rows:
        waiting[row["index"]] = row
        while expected in waiting:
            yield waiting.pop(expected)
            expected += 1
    if waiting:
        raise RuntimeError(f"Ray returned rows {sorted(waiting)[:5]} but never row {expected}")


def _float32(values: Any) -> Any:
    import numpy as np

    return np.asarray(values, dtype=np.float32)


def _root_cause(text: str) -> str:
    """The message of the exception at the bottom of a remote traceback, without its qualified class name."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else text
    return re.sub(r"^[\w.]+(?:Error|Exception): ", "", last)


__all__ = ["tag_dataset", "result_schema", "row_to_record", "record_to_row", "plan_actors", "ActorPlan",
           "RayTagger", "TagBatches", "ParquetSink", "EXTRA_HINT"]
