import numpy as np
import pytest
from PIL import Image

from pruning_utils import broden
from pruning_utils.params import ParameterError

# A hand-written Broden folder: 2 images of 4x4 pixels; label 300 needs the G channel (300 = 44 + 256).
OBJECT_0 = np.array([[1, 1, 300, 300], [1, 1, 300, 300], [0, 0, 1, 1], [0, 0, 1, 1]])
COLOR_0 = np.array([[2, 2, 2, 2], [2, 2, 2, 2], [2, 2, 2, 2], [0, 0, 0, 0]])
OBJECT_1 = np.array([[300, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]])


def _write(path, text):
    path.write_text(text.strip() + "\n")


@pytest.fixture
def fixture_dir(tmp_path):
    d = tmp_path / "broden_tiny"
    (d / "images" / "ade").mkdir(parents=True)
    _write(d / "index.csv", """
image,split,ih,iw,sh,sw,color,object,part,material,scene,texture
ade/a.jpg,train,4,4,4,4,ade/a_color.png,ade/a_object.png,,,301,
ade/b.jpg,val,4,4,4,4,,ade/b_object.png,,,,
""")
    _write(d / "label.csv", """
number,name,category,frequency,coverage,syns
1,wall,object(2),2,1.5,
2,red-c,color(1),1,0.75,
300,lamp,object(2),2,0.3,lamp;light
301,street-s,scene(1),1,1.0,
""")
    _write(d / "category.csv", """
name,first,last,count,frequency
color,1,1,1,1
object,1,2,2,2
scene,1,1,1,1
""")
    _write(d / "c_color.csv", "code,number,name,frequency,coverage\n1,2,red-c,1,0.75")
    _write(d / "c_object.csv", "code,number,name,frequency,coverage\n1,1,wall,2,1.5\n2,300,lamp,2,0.3")
    _write(d / "c_scene.csv", "code,number,name,frequency,coverage\n1,301,street-s,1,1.0")
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 200
    for name in ("a", "b"):
        Image.fromarray(rgb).save(d / "images" / "ade" / f"{name}.jpg")
    for name, labels in (("a_object", OBJECT_0), ("a_color", COLOR_0), ("b_object", OBJECT_1)):
        png = np.zeros((4, 4, 3), np.uint8)
        png[..., 0], png[..., 1] = labels % 256, labels // 256
        Image.fromarray(png).save(d / "images" / "ade" / f"{name}.png")
    return d


def test_fixture_round_trips(fixture_dir):
    data = broden.load(fixture_dir)
    assert data.categories == ("color", "object", "scene")
    assert data.names[1] == "wall" and data.names[300] == "lamp" and data.names[0] == "-"
    assert data.label_category[300] == 1 and data.label_category[2] == 0 and data.label_category[5] == -1
    assert data.index[0]["scene"] == [301] and data.index[0]["object"] == ["ade/a_object.png"]
    seg = broden.read_segmentation(data, 0)  # color, object, scene layers in category order
    np.testing.assert_array_equal(seg[0], COLOR_0)
    np.testing.assert_array_equal(seg[1], OBJECT_0)
    np.testing.assert_array_equal(seg[2], np.full((4, 4), 301))
    np.testing.assert_array_equal(broden.read_segmentation(data, 1), OBJECT_1[None])
    cs = broden.concept_set(data)
    assert cs.masks.shape == (2, 3, 4, 4) and cs.images.shape == (2, 3, 4, 4)
    assert cs.has_category.tolist() == [[True, True, True], [False, True, False]]
    assert cs.masks[1, 1:].eq(0).all()  # image 1 has one layer; the rest is padding
    assert float(cs.images[0, 0].mean()) == pytest.approx(200 / 255, abs=0.02)


def test_category_filter_and_split(fixture_dir):
    data = broden.load(fixture_dir, categories=["color"])
    assert len(data) == 1 and data.categories == ("color",)  # image b has no colour labels: dropped
    assert len(broden.concept_set(broden.load(fixture_dir), split="val")) == 1
    with pytest.raises(ParameterError, match="category='part' is not allowed"):
        broden.load(fixture_dir, categories=["part"])


def test_clear_errors_for_missing_or_malformed_folders(fixture_dir, tmp_path):
    with pytest.raises(broden.BrodenUnavailable, match="broden_dir=.*is not a folder"):
        broden.load(tmp_path / "nowhere")
    (fixture_dir / "c_scene.csv").unlink()
    with pytest.raises(broden.BrodenFormatError, match="c_scene.csv is missing"):
        broden.load(fixture_dir)
    _write(fixture_dir / "c_scene.csv", "code,number,name,frequency,coverage\n1,301,street-s,1,1.0")
    _write(fixture_dir / "label.csv", "number,title\n1,wall")
    with pytest.raises(broden.BrodenFormatError, match="lacks the column"):
        broden.load(fixture_dir)


def test_label_encoding_round_trips():
    numbers = np.array([[0, 1, 255], [256, 300, 65535]])
    png = broden.encode_labels(numbers)
    assert png[1, 1].tolist() == [44, 1, 0]
    np.testing.assert_array_equal(broden.decode_labels(png), numbers)


def test_generator_is_deterministic_labels_every_pixel_and_scene_is_the_shape(tmp_path):
    a = broden.generate(tmp_path / "a", 6, 2, size=24, seed=3)
    b = broden.generate(tmp_path / "b", 6, 2, size=24, seed=3)
    assert (a / "index.csv").read_bytes() == (b / "index.csv").read_bytes()
    assert (a / "images/synthetic/000005.png").read_bytes() == (b / "images/synthetic/000005.png").read_bytes()
    data = broden.load(a)
    assert data.categories == ("color", "object", "texture", "scene")
    cs = broden.concept_set(data)
    assert cs.masks.shape == (8, 4, 24, 24) and cs.has_category.all()
    assert (cs.masks[:, [1, 3]] > 0).all()  # every pixel has an object and a scene
    shape = ~np.isin(cs.masks[:, 1].numpy(), [data.names.index("sky"), data.names.index("ground")])
    assert ((cs.masks[:, [0, 2]] > 0).numpy() == shape[:, None]).all()  # colour and texture: the shapes only
    for n in range(8):
        cats = data.label_category[cs.masks[n].numpy()]
        labelled = cs.masks[n].numpy() > 0
        assert (cats == np.arange(4)[:, None, None])[labelled].all()  # layer g holds category g's labels
        shapes = {data.names[k] for k in cs.masks[n, 1].unique().tolist()} - {"sky", "ground"}
        assert len(shapes) == 1  # one kind of shape per scene, and the scene is named after it
        assert data.names[int(cs.masks[n, 3, 0, 0])] == broden.SCENES[broden.SHAPES.index(shapes.pop())]
    train = broden.scene_split(data, "train")
    assert len(train) == 6 and train.classes == broden.SCENES and train.x.shape == (6, 3, 24, 24)
