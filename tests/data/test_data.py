import numpy as np
import pytest
from conftest import DEMO_CALIB, DEMO_MODEL, DEMO_VAL, conv_model, save
from PIL import Image

from quantkit.data import PreprocessSpec, batches, open_source
from quantkit.errors import QuantkitError
from quantkit.model import load_model


@pytest.fixture(scope="module")
def demo():
    return load_model(DEMO_MODEL)


def take(source, model, n, batch_size=8):
    return list(batches(source, model, batch_size, n))


def test_image_folder_matches_manual_preprocessing(demo, demo_preprocess):
    source = open_source(DEMO_CALIB, demo, demo_preprocess)
    first = take(source, demo, 4)[0]
    for sample_id, arr in zip(first.ids, first.feeds["image"], strict=True):
        pixels = np.asarray(Image.open(sample_id), dtype=np.float32)
        expected = ((pixels / 255.0 - 0.1307) / 0.3081)[None]
        np.testing.assert_allclose(arr, expected, rtol=1e-6, atol=1e-6)
    assert first.labels == [int(i.split("/")[-2]) for i in first.ids]  # labels from folder names


def test_image_folder_shuffle_is_seeded_and_covers_classes(demo, demo_preprocess):
    a = take(open_source(DEMO_CALIB, demo, demo_preprocess, seed=0), demo, 40)
    b = take(open_source(DEMO_CALIB, demo, demo_preprocess, seed=0), demo, 40)
    assert [s for x in a for s in x.ids] == [s for x in b for s in x.ids]
    assert len({label for x in a for label in x.labels}) >= 8
    unshuffled = take(open_source(DEMO_CALIB, demo, demo_preprocess, shuffle=False), demo, 40)
    assert {label for x in unshuffled for label in x.labels} == {0}


def test_parquet_table_with_image_column_and_labels(demo, demo_preprocess):
    source = open_source(DEMO_VAL, demo, demo_preprocess)
    assert source.size == 1000
    got = take(source, demo, 10, batch_size=10)[0]
    assert got.feeds["image"].shape == (10, 1, 28, 28) and got.feeds["image"].dtype == np.float32
    assert all(isinstance(label, int) for label in got.labels)


def test_resize_and_center_crop_to_the_model_size(tmp_path, demo):
    folder = tmp_path / "imgs" / "cat"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((40, 60, 3), 30 * i, np.uint8)).save(folder / f"{i}.jpg")
    spec = PreprocessSpec.from_mapping({"resize": 32, "center_crop": 28, "color": "L"})
    got = take(open_source(tmp_path / "imgs", demo, spec), demo, 3)[0]
    assert got.feeds["image"].shape == (3, 1, 28, 28)


def test_npz_npy_and_folders(tmp_path):
    model = load_model(save(conv_model(), tmp_path / "m.onnx"))
    data = np.random.default_rng(0).normal(size=(10, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=data)
    np.save(tmp_path / "calib.npy", data)
    (tmp_path / "keyed").mkdir()
    np.save(tmp_path / "keyed" / "x.npy", data)
    (tmp_path / "per_sample").mkdir()
    for i in range(10):
        np.savez(tmp_path / "per_sample" / f"{i:03d}.npz", x=data[i])
    for path in ("calib.npz", "calib.npy", "keyed", "per_sample"):
        got = take(open_source(tmp_path / path, model), model, 10, batch_size=4)
        assert [len(b) for b in got] == [4, 4, 2]
        np.testing.assert_array_equal(np.concatenate([b.feeds["x"] for b in got]), data)


def test_dynamic_spatial_axes_start_a_new_batch_per_shape(tmp_path):
    proto = conv_model()
    for d in proto.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.dim_param = "hw"
    for d in proto.graph.output[0].type.tensor_type.shape.dim[2:]:
        d.dim_param = "hw"
    model = load_model(save(proto, tmp_path / "dyn.onnx"))
    for i, size in enumerate([8, 8, 16, 16, 16]):
        np.savez(tmp_path / f"{i}.npz", x=np.ones((3, size, size), np.float32))
    got = take(open_source(tmp_path, model), model, 5)
    assert [b.feeds["x"].shape for b in got] == [(2, 3, 8, 8), (3, 3, 16, 16)]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: np.savez(d / "a.npz", x=np.ones((2, 1, 8, 8), np.float32)), "channels mismatch at axis 1, 1 vs 3"),
        (lambda d: np.savez(d / "a.npz", x=np.ones((2, 3, 9, 8), np.float32)), "size mismatch at axis 2"),
        (lambda d: np.savez(d / "a.npz", x=np.ones((2, 3, 8, 8), np.uint8)), "is uint8 but the model expects float32"),
        (lambda d: np.savez(d / "a.npz", y=np.ones((2, 3, 8, 8), np.float32)), "no array for model input"),
        (lambda d: np.savez(d / "a.npz", x=np.ones((3, 8), np.float32)), "needs rank 4"),
    ],
)
def test_mismatched_arrays_are_named(tmp_path, make, message):
    model = load_model(save(conv_model(), tmp_path / "m.onnx"))
    data = tmp_path / "data"
    data.mkdir()
    make(data)
    with pytest.raises(QuantkitError, match=message):
        take(open_source(data, model), model, None)


def test_nan_in_a_sample_names_the_sample_and_tensor(tmp_path):
    model = load_model(save(conv_model(), tmp_path / "m.onnx"))
    data = np.zeros((4, 3, 8, 8), np.float32)
    data[2, 0, 1, 1] = np.nan
    np.savez(tmp_path / "c.npz", x=data)
    with pytest.raises(QuantkitError, match=r"sample .*c\.npz\[2\]: input 'x' holds 1 NaN/Inf"):
        take(open_source(tmp_path / "c.npz", model), model, None)


def test_fewer_samples_than_asked(tmp_path):
    model = load_model(save(conv_model(), tmp_path / "m.onnx"))
    np.savez(tmp_path / "c.npz", x=np.zeros((5, 3, 8, 8), np.float32))
    with pytest.raises(QuantkitError, match="has only 5 sample.* 6 were asked") as refused:
        take(open_source(tmp_path / "c.npz", model), model, 6)
    assert refused.value.option == "num_samples"


def test_empty_and_unreadable_data(tmp_path, demo, demo_preprocess):
    (tmp_path / "empty").mkdir()
    with pytest.raises(QuantkitError, match="is empty"):
        open_source(tmp_path / "empty", demo)
    with pytest.raises(QuantkitError, match="not found"):
        open_source(tmp_path / "nope", demo)
    bad = tmp_path / "bad" / "0"
    bad.mkdir(parents=True)
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(bad / "good.png")
    (bad / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(QuantkitError, match=r"cannot read image .*broken\.png"):
        take(open_source(tmp_path / "bad", demo, demo_preprocess), demo, None)


def test_fixed_batch_model_needs_matching_batch_size(tmp_path):
    model = load_model(save(conv_model(batch=1), tmp_path / "m.onnx"))
    np.savez(tmp_path / "c.npz", x=np.zeros((5, 3, 8, 8), np.float32))
    with pytest.raises(QuantkitError, match="fixed batch size of 1; use batch size 1") as refused:
        take(open_source(tmp_path / "c.npz", model), model, None, batch_size=8)
    assert refused.value.option == "batch_size"
    assert len(take(open_source(tmp_path / "c.npz", model), model, None, batch_size=1)) == 5


def test_preprocess_config_errors(tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("mean: [0.5]\nstd: [0.5]\ncolour: RGB\n")
    with pytest.raises(QuantkitError, match="unknown preprocessing key.*colour"):
        PreprocessSpec.load(cfg)
    cfg.write_text("resize: 3x4x5\n")
    with pytest.raises(QuantkitError, match="resize must be N or HxW"):
        PreprocessSpec.load(cfg)


def test_negative_dim_values_are_dynamic(tmp_path):
    """Paddle2ONNX writes dynamic axes as dim_value -1: that is not a fixed batch of -1."""
    proto = conv_model()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    model = load_model(save(proto, tmp_path / "m.onnx"))
    assert model.inputs[0].shape[0] is None
    np.savez(tmp_path / "c.npz", x=np.zeros((5, 3, 8, 8), np.float32))
    assert [len(b) for b in take(open_source(tmp_path / "c.npz", model), model, None, batch_size=4)] == [4, 1]


def test_table_image_paths_stay_inside_the_tables_folder(tmp_path):
    from PIL import Image

    from quantkit.data import batches, open_source
    from quantkit.errors import QuantkitError
    from quantkit.model import load_model

    model = load_model(DEMO_MODEL)
    (tmp_path / "t" / "img").mkdir(parents=True)
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "t" / "img" / "a.png")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "outside.png")
    (tmp_path / "t" / "ok.csv").write_text("img,label\nimg/a.png,3\n")
    got = list(batches(open_source(tmp_path / "t" / "ok.csv", model), model, 4))
    assert got[0].feeds["image"].shape == (1, 1, 28, 28) and got[0].labels == [3]
    for bad in ("../outside.png", str(tmp_path / "outside.png")):
        (tmp_path / "t" / "bad.csv").write_text(f"img,label\n{bad},3\n")
        with pytest.raises(QuantkitError, match="leaves the table's folder"):
            list(batches(open_source(tmp_path / "t" / "bad.csv", model), model, 4))
