"""Data sources: each yields ``Sample``s (one sample's input arrays, no batch axis) lazily.

Supported, chosen from the path:
- an image folder (``root/<label>/*.png`` or flat), read through ``datasets``' imagefolder in
  streaming mode, decoded and preprocessed one image at a time;
- a table: ``.parquet`` / ``.arrow`` / ``.csv`` / ``.json(l)`` files (or a folder of them), through
  ``datasets`` in streaming mode; a column named like a model input holds that input's array,
  or an image column (``datasets.Image`` feature, or a column called ``image``) feeds the
  single image input through the preprocessing spec;
- NumPy: a ``.npz`` file keyed by input name, a ``.npy`` file for a single-input model
  (memory-mapped), or a folder of them (``<input name>.npy`` files, or one ``.npz``/``.npy``
  per sample or per batch). Arrays with the model input's rank hold many samples along axis 0.

- a Hugging Face dataset: a folder written by ``save_to_disk``, ``hf:NAME[:split]`` from the local
  cache (offline), or a ``datasets.Dataset`` from Python, with columns named like the inputs or
  an image column, as for tables;
- from Python, any iterable of ``{input_name: array}`` dicts (a generator works), with an
  optional ``"label"`` key.

Nothing holds the whole data set in memory; only the current sample is decoded.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantkit._io import ARRAY_EXTENSIONS, IMAGE_EXTENSIONS, TABLE_EXTENSIONS
from quantkit.data.preprocess import PreprocessSpec
from quantkit.errors import QuantkitError
from quantkit.model import InputSpec, ModelInfo

IMAGE_COLUMN_NAMES = ("image", "img", "pixel_values")
LABEL_COLUMN_NAMES = ("label", "labels", "target", "class")


@dataclass(frozen=True)
class Sample:
    """One sample: where it came from (for error messages), its input arrays, and its label if any."""

    id: str
    feeds: dict[str, np.ndarray]
    label: Any = None


def _offline() -> None:
    # quantkit never downloads: keep datasets/huggingface_hub from trying the network, and quiet:
    # its log lines and progress bars would surround quantkit's own messages.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    # critical only: a failure datasets logs as an error reaches the user as quantkit's one line
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()


def _confined(path_text: str, root: Path, sample_id: str) -> Path:
    """An image path from a table, resolved inside the table's own folder (never outside it)."""
    rel = Path(path_text)
    if rel.is_absolute() or ".." in rel.parts:
        raise QuantkitError(f"{sample_id}: image path {path_text!r} leaves the table's folder {root}; use paths relative to it")
    target = (root / rel).resolve()
    if not target.is_relative_to(root.resolve()):
        raise QuantkitError(f"{sample_id}: image path {path_text!r} resolves outside {root} (a symbolic link?)")
    return target


def _decode_image(ref: Any, sample_id: str, root: Path | None = None) -> Any:
    from PIL import Image

    try:
        if isinstance(ref, dict) and ref.get("bytes"):
            image = Image.open(io.BytesIO(ref["bytes"]))
        elif isinstance(ref, (dict, str)) and root is not None:
            path = ref.get("path") if isinstance(ref, dict) else ref
            if not path:
                raise QuantkitError(f"{sample_id}: the image cell is empty")
            image = Image.open(_confined(path, root, sample_id))
        elif isinstance(ref, dict):
            image = Image.open(ref["path"])
        elif isinstance(ref, Image.Image):
            image = ref
        else:
            raise TypeError(f"unsupported image value of type {type(ref).__name__}")
        image.load()
        return image
    except QuantkitError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types; the user needs the file name
        raise QuantkitError(f"cannot read image {sample_id} ({type(exc).__name__}: {str(exc)[:120]}); remove or replace the file") from None


def _single_image_input(model: ModelInfo, input_name: str | None, what: str) -> InputSpec:
    if input_name is not None:
        return model.input(input_name)
    floats = model.float_inputs
    if len(floats) == 1:
        return floats[0]
    if not floats:
        raise QuantkitError(f"{what} holds images but model {model.path} has no float input to feed them to")
    names = ", ".join(i.name for i in floats)
    raise QuantkitError(
        f"{what} holds images but model {model.path} has several float inputs ({names}); name the input the images feed",
        option="input_name",
    )


#: ONNX metadata keys that list a classifier's class names, in the order tried: JSON or Python
#: literals (a list, or {index: name} as Ultralytics writes "names"), or one name per line
#: (PaddleOCR's "character", e.g. 0/90/180/270 for an orientation classifier), or a comma list
CLASS_NAME_KEYS = ("class_names", "classes", "labels", "names", "character")


def class_names_from_metadata(proto: Any) -> tuple[list[str], str] | None:
    """The model's class names from its metadata, and the key they came from."""
    import ast

    props = {p.key: p.value for p in getattr(proto, "metadata_props", [])}
    for key in CLASS_NAME_KEYS:
        text = props.get(key, "").strip()
        if not text:
            continue
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text.splitlines() if "\n" in text else text.split(",")
        if isinstance(value, dict) and all(isinstance(k, int) for k in value):
            value = [value[k] for k in sorted(value)]
        if isinstance(value, (list, tuple)) and len(value) >= 2:
            return [str(v).strip() for v in value], f"the model's metadata ({key!r})"
    return None


@dataclass(frozen=True)
class LabelMap:
    """How label folder names become class indices, and what said so."""

    index: dict[str, int]
    source: str

    def describe(self) -> str:
        shown = ", ".join(f"{k} -> {v}" for k, v in sorted(self.index.items(), key=lambda kv: kv[1])[:12])
        return f"folder names -> class indices by {self.source}: {shown}" + (", ..." if len(self.index) > 12 else "")


def folder_labels(folders: list[str], names: tuple[list[str], str] | None) -> LabelMap:
    """Class indices for label folders: by the class names (given, or the model's metadata), else
    numerically when every folder name is an integer, else alphabetically (datasets' imagefolder
    rule, which numbers "0, 180, 270, 90" as 0, 1, 2, 3: printed, so a mismatch is visible)."""
    if names is not None:
        listed, source = names
        unknown = sorted(set(folders) - set(listed))
        if unknown:
            raise QuantkitError(
                f"label folder(s) {', '.join(unknown[:5])} are not among the class names of {source} "
                f"({', '.join(listed[:8])}{', ...' if len(listed) > 8 else ''}); rename the folders or give the class names",
                option="class_names",
            )
        return LabelMap({f: listed.index(f) for f in folders}, source)
    if all(f.lstrip("-").isdigit() for f in folders):
        return LabelMap({f: int(f) for f in folders}, "their numbers (every folder name is an integer)")
    return LabelMap({f: i for i, f in enumerate(sorted(folders))}, "alphabetical order (no class names given or in the model)")


class ImageFolderSource:
    """Images under a folder (by-label subfolders or flat), via datasets' imagefolder builder;
    labels from the subfolder names (``folder_labels``)."""

    def __init__(
        self,
        root: Path,
        model: ModelInfo,
        preprocess: PreprocessSpec,
        input_name: str | None,
        shuffle: bool,
        seed: int,
        class_names: tuple[str, ...] | None = None,
    ) -> None:
        self.root = root
        self.input = _single_image_input(model, input_name, f"image folder {root}")
        self.preprocess = preprocess.resolved(self.input)
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if shuffle:  # a label-sorted folder must not yield only the first classes for a subset
            files = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
        self.files = files
        self.size: int | None = len(files)
        self.description = f"image folder {root} ({len(files)} images)"
        folders = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
        given = (list(class_names), "--class-names") if class_names else class_names_from_metadata(model.proto)
        self.labels: LabelMap | None = folder_labels(folders, given) if folders else None

    def _label(self, path: Path) -> int | None:
        parts = path.relative_to(self.root).parts
        return self.labels.index[parts[0]] if self.labels is not None and len(parts) > 1 else None

    def __iter__(self) -> Iterator[Sample]:
        _offline()
        import datasets

        ds = datasets.load_dataset("imagefolder", data_files={"train": [str(f) for f in self.files]}, split="train", streaming=True)
        ds = ds.cast_column("image", datasets.Image(decode=False))
        for path, row in zip(self.files, ds, strict=True):
            image = _decode_image(row["image"], str(path))
            yield Sample(str(path), {self.input.name: self.preprocess.apply(image)}, self._label(path))


class TableSource:
    """Rows of parquet/arrow/csv/json files, streamed through ``datasets``."""

    def __init__(
        self,
        files: list[Path],
        builder: str,
        model: ModelInfo,
        preprocess: PreprocessSpec,
        input_name: str | None,
        label_column: str | None,
    ) -> None:
        self.files, self.builder, self.model = files, builder, model
        self.preprocess_base, self.input_name, self.label_column = preprocess, input_name, label_column
        self.size: int | None = self._count_rows() if builder == "parquet" else None
        where = files[0] if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"
        self.description = f"{builder} data {where}"

    def _count_rows(self) -> int | None:
        try:
            import pyarrow.parquet as pq

            return sum(pq.ParquetFile(f).metadata.num_rows for f in self.files)
        except Exception:  # noqa: BLE001 - the count is only for the progress bar; iteration reports real errors
            return None

    def __iter__(self) -> Iterator[Sample]:
        _offline()
        import datasets

        try:
            ds = datasets.load_dataset(self.builder, data_files={"train": [str(f) for f in self.files]}, split="train", streaming=True)
            features = ds.features or {}
        except Exception as exc:  # noqa: BLE001
            raise QuantkitError(f"cannot read {self.description}: {exc}") from None
        base = self.files[0] if len(self.files) == 1 else self.files[0].parent
        yield from _dataset_samples(
            ds,
            features,
            self.model,
            self.preprocess_base,
            self.input_name,
            self.label_column,
            self.description,
            str(base),
            self.files[0].parent,
        )


def _image_column(ds: Any, features: dict[str, Any], model: ModelInfo) -> tuple[Any, list[str] | None, str | None]:
    """The dataset (its image column left undecoded), its columns, and the column holding images (None: arrays only)."""
    import datasets

    columns = list(features) if features else None
    if columns is None:  # streaming CSV/JSON readers know their columns only from a row
        first = next(iter(ds), None)
        columns = list(first) if first is not None else None
    image_column = next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
    if image_column is None and columns:
        image_column = next((c for c in IMAGE_COLUMN_NAMES if c in columns and c not in {i.name for i in model.inputs}), None)
    if image_column is not None and isinstance(features.get(image_column), datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return ds, columns, image_column


def _dataset_samples(
    ds: Any,
    features: Any,
    model: ModelInfo,
    preprocess_base: PreprocessSpec,
    input_name: str | None,
    label_column: str | None,
    description: str,
    base: str,
    root: Path | None,
) -> Iterator[Sample]:
    """Samples from the rows of a ``datasets`` dataset: columns named like the model's inputs hold
    their arrays, or an image column feeds the single image input through the preprocessing."""
    ds, columns, image_column = _image_column(ds, features or {}, model)
    label_column = label_column or (next((c for c in LABEL_COLUMN_NAMES if c in columns), None) if columns else None)
    image_input = preprocess = None
    if image_column is not None:
        image_input = _single_image_input(model, input_name, description)
        preprocess = preprocess_base.resolved(image_input)
    wanted = [i for i in model.inputs if image_input is None or i.name != image_input.name]
    if columns is not None:
        missing = [i.name for i in wanted if i.name not in columns]
        if missing:
            raise QuantkitError(
                f"{description} has no column for model input(s) {', '.join(missing)} (columns: {', '.join(columns)}); "
                "name the columns after the inputs, or give an image column"
            )
    for row_no, row in enumerate(ds):
        sample_id = f"{base} row {row_no}"
        feeds: dict[str, np.ndarray] = {}
        if image_input is not None and preprocess is not None:
            feeds[image_input.name] = preprocess.apply(_decode_image(row[image_column], sample_id, root))
        for spec in wanted:
            if spec.name not in row:
                raise QuantkitError(f"{sample_id} has no value for model input '{spec.name}'")
            feeds[spec.name] = _row_array(row[spec.name], spec, sample_id)
        yield Sample(sample_id, feeds, row.get(label_column) if label_column else None)


def _row_array(value: Any, spec: InputSpec, sample_id: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except ValueError:
        raise QuantkitError(f"{sample_id}: column '{spec.name}' holds ragged nested lists; store one array per row") from None
    per_sample = spec.sample_shape
    if arr.ndim == 1 and len(per_sample) > 1 and all(isinstance(d, int) for d in per_sample):
        size = int(np.prod(per_sample))
        if arr.size == size:  # flattened arrays are common in tables
            arr = arr.reshape(tuple(int(d) for d in per_sample))
    return arr


def _read_npy(f: Path) -> np.ndarray:
    """A .npy file, memory-mapped (never unpickled); a file numpy cannot read is bad input."""
    try:
        return np.load(f, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy's errors for corrupt, pickled or truncated files
        raise QuantkitError(f"cannot read {f} as NumPy data ({type(exc).__name__}: {exc})") from None


class ArraySource:
    """NumPy arrays keyed by input name: .npz / .npy files or a folder of them."""

    def __init__(self, path: Path, model: ModelInfo) -> None:
        self.path, self.model = path, model
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in ARRAY_EXTENSIONS and p.is_file())
            if not files:
                raise QuantkitError(f"data directory {path} is empty: no images, tables, .npy or .npz files found")
            names = {i.name for i in model.inputs}
            self.keyed_npy = [f for f in files if f.suffix == ".npy" and f.stem in names]
            self.files = files if not self.keyed_npy else []
        else:
            self.keyed_npy, self.files = [], [path]
        self.size = self._count()
        self.description = f"array data {path}"

    def _count(self) -> int | None:
        if self.keyed_npy:
            arr = _read_npy(self.keyed_npy[0])
            spec = self.model.input(self.keyed_npy[0].stem)
            return int(arr.shape[0]) if arr.ndim == len(spec.shape) else 1
        return None

    def __iter__(self) -> Iterator[Sample]:
        if self.keyed_npy:
            yield from self._iter_keyed(self.keyed_npy)
            return
        for f in self.files:
            yield from self._iter_file(f)

    def _load(self, f: Path) -> dict[str, np.ndarray]:
        try:
            if f.suffix.lower() == ".npy":
                arr = _read_npy(f)
                floats = self.model.float_inputs or self.model.inputs
                if len(self.model.inputs) != 1:
                    names = ", ".join(i.name for i in self.model.inputs)
                    raise QuantkitError(f"{f} holds one array but the model has inputs {names}; use a .npz keyed by input name")
                return {floats[0].name: arr}
            with np.load(f, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except QuantkitError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise QuantkitError(f"cannot read {f} as NumPy data ({type(exc).__name__}: {exc})") from None

    def _iter_keyed(self, files: list[Path]) -> Iterator[Sample]:
        arrays = {f.stem: _read_npy(f) for f in files}
        yield from split_arrays(self.model, arrays, str(self.path))

    def _iter_file(self, f: Path) -> Iterator[Sample]:
        yield from split_arrays(self.model, self._load(f), str(f))


def split_arrays(model: ModelInfo, arrays: dict[str, Any], where: str, label: Any = None) -> Iterator[Sample]:
    """Samples from arrays keyed by input name, each holding one sample or many along the input's
    batch axis (axis 1 of an RNN state); an input every sample shares is given once."""
    missing = [i.name for i in model.inputs if i.name not in arrays]
    if missing:
        raise QuantkitError(f"{where} has no array for model input(s) {', '.join(missing)} (keys: {', '.join(arrays) or 'none'})")
    batched = {spec.name: _holds_many(spec, np.asarray(arrays[spec.name]), where) for spec in model.inputs}
    axes = {spec.name: spec.batch_axis for spec in model.inputs}
    counts = {np.asarray(arrays[n]).shape[axes[n]] for n, b in batched.items() if b}
    if len(counts) > 1:
        raise QuantkitError(f"{where}: arrays hold different numbers of samples ({sorted(counts)})")
    n = counts.pop() if counts else 1
    for k in range(n):
        feeds = {
            name: np.take(np.asarray(arrays[name]), k, axis=axes[name]) if batched[name] else np.asarray(arrays[name]) for name in batched
        }
        labels = label if label is None or not any(batched.values()) or np.ndim(label) == 0 else label[k]
        yield Sample(f"{where}[{k}]" if any(batched.values()) else where, feeds, labels)


def _holds_many(spec: InputSpec, arr: np.ndarray, where: str) -> bool:
    """Whether an array holds many samples along the input's batch axis (else it is one sample)."""
    if spec.batch_axis is None:
        if arr.ndim != len(spec.shape):
            raise QuantkitError(
                f"{where}: array '{spec.name}' has shape {arr.shape} but model input {spec.describe()} (shared by every sample, "
                f"no batch axis) needs rank {len(spec.shape)}",
                option="data",
            )
        return False
    if arr.ndim in (len(spec.shape), len(spec.shape) - 1):
        return arr.ndim == len(spec.shape)
    raise QuantkitError(
        f"{where}: array '{spec.name}' has shape {arr.shape} but model input {spec.describe()} needs rank "
        f"{len(spec.shape)} (many samples along axis {spec.batch_axis}) or {len(spec.shape) - 1} (one sample)",
        option="data",
    )


class DatasetSource:
    """A ``datasets.Dataset`` / ``IterableDataset``: one saved with ``save_to_disk``, one in the
    local Hugging Face cache (``hf:NAME[:split]``, offline), or one passed from Python."""

    def __init__(
        self, ds: Any, description: str, model: ModelInfo, preprocess: PreprocessSpec, input_name: str | None, label_column: str | None
    ) -> None:
        self.ds, self.description, self.model = ds, description, model
        self.preprocess_base, self.input_name, self.label_column = preprocess, input_name, label_column
        self.size: int | None = len(ds) if hasattr(ds, "__len__") else None

    def __iter__(self) -> Iterator[Sample]:
        yield from _dataset_samples(
            self.ds, getattr(self.ds, "features", None), self.model, self.preprocess_base, self.input_name, self.label_column,
            self.description, self.description, None,
        )  # fmt: skip


class IterableSource:
    """Any Python iterable of ``{input_name: array}`` dicts (one sample each, or many along axis 0;
    a ``"label"`` key gives labels), e.g. a generator."""

    REPLAYED = 64  # samples of a generator's first, partial pass (a peek at the first batch) kept for the next

    def __init__(self, items: Any, model: ModelInfo) -> None:
        self.items, self.model = items, model
        self.size: int | None = len(items) if hasattr(items, "__len__") else None
        self.description = f"Python {type(items).__name__}"
        self._stream: Iterator[Sample] | None = None
        self._taken: list[Sample] = []
        self._passes = 0
        self._exhausted = False

    def __iter__(self) -> Iterator[Sample]:
        if iter(self.items) is not self.items:  # a list, or anything that iterates afresh
            yield from self._samples()
            return
        # a generator runs once: what an earlier pass peeked at is replayed, the rest streams on
        if self._exhausted:
            raise QuantkitError(f"the {self.description} was already read to its end; pass a list, or a new generator")
        self._passes += 1
        first_pass = self._passes == 1
        if self._stream is None:
            self._stream = self._samples()
        yield from list(self._taken)
        for sample in self._stream:
            if first_pass and len(self._taken) < self.REPLAYED:
                self._taken.append(sample)
            elif first_pass:
                self._taken.clear()  # read past the replay window: a full pass, nothing to replay
                first_pass = False
            yield sample
        self._exhausted = True

    def _samples(self) -> Iterator[Sample]:
        names = {i.name for i in self.model.inputs}
        for k, item in enumerate(self.items):
            if not isinstance(item, dict):
                raise QuantkitError(
                    f"item {k} of the {self.description} is a {type(item).__name__}: give dicts of {{input name: array}} "
                    f"(inputs: {', '.join(sorted(names))})"
                )
            arrays = {n: v for n, v in item.items() if n in names}
            unknown = sorted(set(item) - names - {"label"})
            if unknown:
                raise QuantkitError(f"item {k} of the {self.description} has key(s) {', '.join(unknown)} that name no model input")
            yield from split_arrays(self.model, arrays, f"item {k}", item.get("label"))


def _hf_dataset(spec: str) -> tuple[Any, str]:
    """``hf:NAME[:split]`` from the local Hugging Face cache, never the network."""
    _offline()
    import datasets

    name, _, split = spec[3:].partition(":")
    if not name:
        raise QuantkitError(f"{spec!r}: use hf:NAME or hf:NAME:split")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # noqa: BLE001 - offline: a dataset not in the cache fails here
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise QuantkitError(
            f"{spec}: not in the local Hugging Face cache ({first}); quantkit never downloads: "
            "load it once with datasets.load_dataset, or save it with save_to_disk and pass the folder"
        ) from None
    return ds, f"Hugging Face dataset {name} ({split or 'train'})"


def _saved_dataset(path: Path) -> tuple[Any, str]:
    _offline()
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001
        raise QuantkitError(f"cannot read the saved dataset {path}: {type(exc).__name__}: {str(exc)[:160]}") from None
    if isinstance(ds, datasets.DatasetDict):
        split = "validation" if "validation" in ds else "train" if "train" in ds else next(iter(ds))
        return ds[split], f"saved dataset {path} ({split})"
    return ds, f"saved dataset {path}"


def open_source(
    path: str | Path | Any,
    model: ModelInfo,
    preprocess: PreprocessSpec | None = None,
    *,
    input_name: str | None = None,
    shuffle: bool = True,
    seed: int = 0,
    label_column: str | None = None,
    class_names: tuple[str, ...] | None = None,
) -> ImageFolderSource | TableSource | ArraySource | DatasetSource | IterableSource:
    """Pick the source for ``path`` (see the module docstring); bad paths are clear errors.

    ``path`` may also be ``hf:NAME[:split]``, a ``datasets.Dataset``, or any iterable of
    ``{input_name: array}`` dicts.
    """
    preprocess = preprocess or PreprocessSpec()
    if not isinstance(path, (str, Path)):
        if type(path).__module__.startswith("datasets"):
            return DatasetSource(path, f"dataset {type(path).__name__}", model, preprocess, input_name, label_column)
        if not hasattr(path, "__iter__"):
            raise QuantkitError(f"data must be a path, a datasets.Dataset or an iterable of dicts, got {type(path).__name__}")
        return IterableSource(path, model)
    if isinstance(path, str) and path.startswith("hf:"):
        return DatasetSource(*_hf_dataset(path), model, preprocess, input_name, label_column)
    path = Path(path)
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        return DatasetSource(*_saved_dataset(path), model, preprocess, input_name, label_column)
    if not path.exists():
        raise QuantkitError(f"data path not found: {path}")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in ARRAY_EXTENSIONS:
            return ArraySource(path, model)
        if suffix in TABLE_EXTENSIONS:
            return TableSource([path], TABLE_EXTENSIONS[suffix], model, preprocess, input_name, label_column)
        raise QuantkitError(
            f"cannot tell how to read {path}: give an image folder, a .parquet/.arrow/.csv/.jsonl table, or .npy/.npz arrays"
        )
    try:
        entries = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
    except OSError as exc:
        raise QuantkitError(f"cannot list data directory {path}: {exc.strerror}") from None
    suffixes = {p.suffix.lower() for p in entries}
    if suffixes & IMAGE_EXTENSIONS:
        return ImageFolderSource(path, model, preprocess, input_name, shuffle, seed, class_names)
    tables = sorted(p for p in entries if p.suffix.lower() in TABLE_EXTENSIONS)
    if tables:
        builders = {TABLE_EXTENSIONS[p.suffix.lower()] for p in tables}
        if len(builders) > 1:
            raise QuantkitError(f"data directory {path} mixes table formats ({', '.join(sorted(builders))}); keep one")
        return TableSource(tables, builders.pop(), model, preprocess, input_name, label_column)
    if suffixes & ARRAY_EXTENSIONS:
        return ArraySource(path, model)
    raise QuantkitError(f"data directory {path} is empty: no images, tables, .npy or .npz files found")
