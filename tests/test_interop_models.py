"""PyTorch checkpoints in and out of the networks: exact round trips, partial loads, files, errors."""

from __future__ import annotations

import io

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_models_reference as ref
from cankd_jax import models
from cankd_jax.interop import torch as interop
from conftest import assert_close, nchw, nhwc
from models_helpers import D8, NARROW, variables_from



def _torch_segmenter(seed=0, blocks=(1, 1, 1, 1)):
    return ref.randomize_(ref.EncoderDecoder(
        ref.ResNet(18, stage_blocks=blocks, **D8, **NARROW), ref.ASPPHead(64, 16, 5),
        ref.FCNHead(32, 8, 5, num_convs=1, concat_input=False)), seed)


def _segmenter(blocks=(1, 1, 1, 1), **kwargs):
    return models.make_model("deeplabv3", backbone="resnet18_v1c_d8", num_classes=5,
                             backbone_kwargs=dict(stage_blocks=blocks, **NARROW), **kwargs)


def _torch_trunk(blocks=(1, 1, 1, 1), seed=0):
    tm = torch.nn.Module()
    tm.backbone = ref.ResNet(50, stage_blocks=blocks, **NARROW)
    tm.neck = ref.FPN([32, 64, 128, 256], 16, num_outs=5, start_level=1, add_extra_convs="on_input")
    return ref.randomize_(tm, seed)


def _trunk(blocks=(1, 1, 1, 1)):
    return models.make_model("retinanet_fpn", backbone="resnet50", out_channels=16,
                             backbone_kwargs=dict(stage_blocks=blocks, **NARROW))


def _assert_same_state_dict(ours, theirs):
    assert sorted(ours) == sorted(theirs), "keys differ"
    for k, v in theirs.items():
        expected = v.numpy()
        assert ours[k].shape == expected.shape and ours[k].dtype == expected.dtype, k
        assert np.array_equal(ours[k], expected), k


@pytest.mark.parametrize("case", ["torchvision_resnet18", "mmseg_deeplabv3_v1c_d8", "mmdet_retinanet_trunk"])
def test_import_then_export_is_the_identity(case):
    if case == "torchvision_resnet18":
        tm, model = ref.randomize_(ref.ResNet(18, num_classes=10, **NARROW)), models.ResNet(18, num_classes=10, **NARROW)
    elif case == "mmseg_deeplabv3_v1c_d8":
        tm, model = _torch_segmenter(), _segmenter()
    else:
        tm, model = _torch_trunk(), _trunk()
    sd = tm.state_dict()
    variables, report = interop.import_state_dict(model, sd)
    assert not report.missing and not report.unexpected and len(report.loaded) == len(sd)
    _assert_same_state_dict(interop.export_state_dict(model, variables), sd)


def test_layout_uses_the_source_projects_keys():
    layout = interop.state_dict_layout(_segmenter())
    keys = list(layout)
    assert keys[:3] == ["backbone.stem.0.weight", "backbone.stem.1.weight", "backbone.stem.1.bias"]
    for key in ("backbone.stem.7.num_batches_tracked", "backbone.layer4.0.downsample.0.weight",
                "decode_head.image_pool.1.conv.weight", "decode_head.image_pool.1.bn.running_var",
                "decode_head.aspp_modules.3.conv.weight", "decode_head.bottleneck.bn.weight",
                "decode_head.conv_seg.bias", "auxiliary_head.convs.0.conv.weight", "auxiliary_head.conv_seg.weight"):
        assert key in layout, key
    assert layout["decode_head.aspp_modules.0.conv.weight"].torch_shape == (16, 64, 1, 1)
    assert layout["decode_head.aspp_modules.1.conv.weight"].torch_shape == (16, 64, 3, 3)
    trunk = interop.state_dict_layout(_trunk())
    assert "neck.lateral_convs.0.conv.bias" in trunk and "neck.fpn_convs.4.conv.weight" in trunk


def test_exported_student_loads_into_pytorch_and_computes_the_same():
    model = _segmenter()
    tm = _torch_segmenter()
    variables, _ = interop.import_state_dict(model, tm.state_dict())
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    # One training-mode pass moves the running statistics and the counters away from the import.
    _, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"],
                                              rngs={"dropout": jax.random.key(0)}))(variables, x)
    trained = {"params": jax.tree.map(lambda p: p * 1.01, variables["params"]), "batch_stats": upd["batch_stats"]}
    fresh = ref.EncoderDecoder(ref.ResNet(18, stage_blocks=(1, 1, 1, 1), **D8, **NARROW), ref.ASPPHead(64, 16, 5),
                               ref.FCNHead(32, 8, 5, num_convs=1, concat_input=False))
    fresh.load_state_dict(interop.export_state_dict(model, trained, tensors=True), strict=True)
    assert int(fresh.backbone.stem[1].num_batches_tracked) == int(tm.backbone.stem[1].num_batches_tracked) + 1
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(trained, x)
    with torch.no_grad():
        expected = fresh.eval()(nchw(x))
    assert_close(out["logits"], nhwc(expected["logits"]), what="logits")


def test_pth_files_round_trip_in_mmcv_and_plain_format(tmp_path):
    tm, model = _torch_trunk(), _trunk()
    sd = tm.state_dict()
    wrapped = tmp_path / "retinanet.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": sd, "optimizer": {}}, wrapped)
    variables, _ = interop.load_checkpoint(str(wrapped), model)
    out_path = tmp_path / "student.pth"
    interop.export_pytorch_network(model, variables, str(out_path))
    raw = torch.load(out_path, weights_only=True)
    assert set(raw) == {"state_dict", "meta"}
    _assert_same_state_dict({k: v.numpy() for k, v in interop.load_pth(str(out_path)).items()}, sd)
    plain = tmp_path / "plain.pth"
    interop.save_pth(interop.export_state_dict(model, variables), str(plain))
    assert set(torch.load(plain, weights_only=True)) == set(sd)
    again = interop.load_pytorch_network(str(plain), model)
    chex.assert_trees_all_equal(again, jax.device_get(variables))
    # A DDP-saved file ('module.' before every key): the error shows the file's keys and the mapping to use
    ddp = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in sd.items()}, ddp)
    with pytest.raises(ValueError, match=r"missing keys: .*; the file's keys look like module\.backbone\..* \(map "
                                         r"them with checkpoint_prefixes"):
        interop.load_pytorch_network(str(ddp), model)
    mapped = interop.load_pytorch_network(str(ddp), model, {"checkpoint_prefixes": [("", "module.")]})
    chex.assert_trees_all_equal(mapped, jax.device_get(variables))


def test_load_resnet_reads_a_backbone_out_of_a_segmentation_checkpoint():
    sd = _torch_segmenter().state_dict()
    model, variables = interop.load_resnet(sd, depth=18, key_prefix="backbone.", **NARROW, strides=(1, 2, 1, 1),
                                           dilations=(1, 1, 2, 4), stage_blocks=(1, 1, 1, 1))
    assert model.deep_stem and model.num_classes is None
    assert np.array_equal(np.asarray(variables["params"]["stem.0"]["kernel"]),
                          sd["backbone.stem.0.weight"].numpy().transpose(2, 3, 1, 0))


def test_imagenet_backbone_into_a_segmenter_is_a_partial_load():
    imagenet = ref.randomize_(ref.ResNet(18, num_classes=1000, stage_blocks=(1, 1, 1, 1), **D8, **NARROW)).state_dict()
    model = _segmenter()
    init = variables_from(model, _torch_segmenter(seed=1))
    with pytest.raises(ValueError, match="init_variables"):
        interop.import_state_dict(model, imagenet, key_prefixes={"backbone.": ""}, strict=False)
    variables, report = interop.import_state_dict(model, imagenet, key_prefixes={"backbone.": ""}, strict=False,
                                                  init_variables=init)
    assert report.unexpected == ("fc.bias", "fc.weight")
    assert "decode_head.conv_seg.weight" in report.missing and not any(k.startswith("backbone.") for k in report.missing)
    assert np.array_equal(variables["params"]["decode_head"]["conv_seg"]["kernel"],
                          init["params"]["decode_head"]["conv_seg"]["kernel"])
    assert int(variables["batch_stats"]["backbone"]["layer2.0"]["bn1"]["num_batches_tracked"]) == int(
        imagenet["layer2.0.bn1.num_batches_tracked"])


def test_dagger_takes_the_teachers_neck_only():
    teacher_sd = _torch_trunk(blocks=(1, 1, 2, 1), seed=1).state_dict()  # deeper backbone, same widths
    student = _trunk()
    init = variables_from(student, _torch_trunk(seed=2))
    variables, report = interop.import_state_dict(student, teacher_sd, key_prefixes={"neck.": "neck."}, strict=False,
                                                  init_variables=init)
    assert report.loaded and all(k.startswith("neck.") for k in report.loaded)
    assert not report.unexpected  # the teacher's backbone keys were not asked for
    out = interop.export_state_dict(student, variables)
    assert np.array_equal(out["neck.fpn_convs.4.conv.weight"], teacher_sd["neck.fpn_convs.4.conv.weight"].numpy())
    assert np.array_equal(variables["params"]["backbone"]["conv1"]["kernel"], init["params"]["backbone"]["conv1"]["kernel"])


def test_key_problems_are_reported_by_name():
    tm, model = _torch_segmenter(), _segmenter()
    sd = dict(tm.state_dict())
    missing = {k: v for k, v in sd.items() if k != "decode_head.image_pool.1.bn.running_mean"}
    with pytest.raises(ValueError, match=r"missing keys: decode_head\.image_pool\.1\.bn\.running_mean"):
        interop.import_state_dict(model, missing)
    with pytest.raises(ValueError, match=r"unexpected keys: decode_head\.extra\.weight"):
        interop.import_state_dict(model, {**sd, "decode_head.extra.weight": torch.zeros(1)})
    bad = {**sd, "decode_head.conv_seg.weight": torch.zeros(6, 16, 1, 1)}
    with pytest.raises(ValueError, match=r"decode_head\.conv_seg\.weight \(6, 16, 1, 1\) \(expected \(5, 16, 1, 1\)\)"):
        interop.import_state_dict(model, bad)
    wrong_model = models.make_model("pspnet", backbone="resnet18_v1c_d8", num_classes=5,
                                    backbone_kwargs=dict(stage_blocks=(1, 1, 1, 1), **NARROW))
    with pytest.raises(ValueError, match=r"other shapes: decode_head\.bottleneck\.conv\.weight .*"
                                         r"missing keys: .*psp_modules.*unexpected keys: .*aspp_modules"):
        interop.import_state_dict(wrong_model, sd)


def test_old_checkpoints_without_batch_counters_load_as_zero():
    sd = {k: v for k, v in ref.ResNet(18, **NARROW).state_dict().items() if not k.endswith("num_batches_tracked")}
    variables, report = interop.import_state_dict(models.ResNet(18, **NARROW), sd)
    assert not report.missing and int(variables["batch_stats"]["bn1"]["num_batches_tracked"]) == 0


_RAN = []  # what the objects below did when unpickled: nothing, unless their code ran


def _ran(what):
    _RAN.append(what)


class _Tripwire:
    """An object whose unpickling runs code of the file's choosing (here: a harmless record of it)."""

    def __reduce__(self):
        return _ran, ("reduce",)


class _Meta(dict):  # a dict subclass: the restricted unpickler can only fill in plain dicts
    def __setstate__(self, state):
        _ran("setstate")


def _runner_checkpoint(path, **extra):
    """A training checkpoint as mmengine's runner writes one (not published: optimizer, schedulers and message
    hub kept), built from mmengine's own objects and written by its save_checkpoint."""
    from mmengine.logging import MessageHub
    from mmengine.optim import MultiStepLR, OptimWrapper
    from mmengine.runner.checkpoint import save_checkpoint, weights_to_cpu

    net = torch.nn.Conv2d(3, 4, 3)
    optim = OptimWrapper(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
    hub = MessageHub.get_instance("cankd_jax_test")
    hub.update_scalar("train/loss", 1.5)
    hub.update_scalar("train/lr", np.float64(0.1))
    schedule = MultiStepLR(optim, milestones=[8, 11], by_epoch=False)
    net(torch.randn(1, 3, 8, 8)).sum().backward()
    optim.step()
    meta = {"epoch": 1, "iter": 3, "seed": np.int64(0), "dataset_meta": {"classes": ("a", "b")}, **extra}
    save_checkpoint({"meta": meta, "state_dict": weights_to_cpu(net.state_dict()), "message_hub": hub.state_dict(),
                     "optimizer": optim.state_dict(), "param_schedulers": [schedule.state_dict()]}, str(path))
    return net.state_dict()


def test_a_training_checkpoint_is_read_for_its_weights_without_running_its_code(tmp_path, caplog):
    """torch.load(weights_only=True) refuses mmengine's training checkpoints (numpy values, HistoryBuffers in the
    message hub), and train.py had no way past it: the objects beside the weights are now skipped unread."""
    weights = _runner_checkpoint(tmp_path / "iter_3.pth", tripwire=_Tripwire())
    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(tmp_path / "iter_3.pth", weights_only=True)  # what it would be without the stand-ins
    with caplog.at_level("INFO"):
        state = interop.load_pth(str(tmp_path / "iter_3.pth"))
    assert list(state) == list(weights) and all(torch.equal(state[k], weights[k]) for k in weights)
    assert _RAN == []  # the tripwire's reduce never ran
    assert "skipped the pickled objects beside the weights" in caplog.text
    assert "mmengine.logging.history_buffer.HistoryBuffer" in caplog.text and "test_interop_models._ran" in caplog.text
    assert "numpy._core.multiarray.scalar" in caplog.text  # numpy's objects too: never built from a file
    # The same in the format torch.save wrote before 1.6 (a plain pickle stream; many 2020 model-zoo files)
    legacy = {"meta": {"seed": np.int64(0), "palette": np.zeros((2, 3), np.int64), "note": _Tripwire()},
              "state_dict": weights}
    torch.save(legacy, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    caplog.clear()
    with caplog.at_level("INFO"):
        state = interop.load_pth(str(tmp_path / "legacy.pth"))
    assert list(state) == list(weights) and all(torch.equal(state[k], weights[k]) for k in weights)
    assert "numpy.ndarray, test_interop_models._ran), unread" in caplog.text and _RAN == []


def _crafted_numpy_pickle(path):
    """A pickle that, were numpy's constructors allowed, would make numpy read 8 bytes of the file as an object
    pointer (a structured dtype's flags set from the pickle: how an object array over raw memory is built)."""
    import struct
    import zipfile

    out = bytearray(b"\x80\x02}")  # protocol 2, an empty dict

    def text(s):
        out.extend(b"X" + struct.pack("<I", len(s.encode())) + s.encode())

    def name(module, attr):
        out.extend(f"c{module}\n{attr}\n".encode())

    def call(*parts):  # MARK, the arguments, TUPLE, REDUCE
        out.extend(b"(")
        for part in parts:
            part()
        out.extend(b"tR")

    def object_dtype():
        name("numpy", "dtype")
        call(lambda: text("O"), lambda: out.extend(b"\x89\x88"))

    text("x")
    name("numpy._core.multiarray", "_reconstruct")
    call(lambda: name("numpy", "ndarray"), lambda: out.extend(b"(K\x00t"), lambda: text("b"))
    out.extend(b"(K\x01(K\x01t")  # the array's state: version 1, shape (1,), then its dtype:
    name("numpy", "dtype")
    call(lambda: out.extend(b"](("), lambda: text("a"), lambda: text("O"), lambda: out.extend(b"te\x89\x88"))
    out.extend(b"(K\x03")
    text("|")
    out.extend(b"N(")
    text("a")
    out.extend(b"t}(")
    text("a")
    out.extend(b"(")
    object_dtype()
    out.extend(b"K\x00tuK\x08K\x01K=tb\x89")  # ... its flags 0x3d (objects, not pickled as a list), BUILD
    name("_codecs", "encode")
    call(lambda: text("AAAAAAAA"), lambda: text("latin1"))
    out.extend(b"tbs.")  # the array's BUILD from those bytes, SETITEM, STOP
    template = io.BytesIO()
    torch.save({}, template)
    with zipfile.ZipFile(template) as original, zipfile.ZipFile(path, "w") as crafted:
        for info in original.infolist():
            crafted.writestr(info.filename, bytes(out) if info.filename.endswith("/data.pkl") else
                             original.read(info.filename))


def test_numpy_values_are_never_built_from_a_pickle(tmp_path):
    """Objects beside the weights stand in as one inert class; numpy's constructors are no exception: given a
    pickle's dtype state, numpy builds object arrays over raw pointers (this process died reading the file below
    when the stand-ins let numpy build arrays). A state dict of numpy arrays is refused as weights_only refuses it."""
    _crafted_numpy_pickle(tmp_path / "crafted.pth")
    with pytest.raises(ValueError, match=r"crafted.pth': the state dict holds pickled objects, not tensors, under "
                                         r"x \(of the classes or functions numpy.*_reconstruct"):
        interop.load_pth(str(tmp_path / "crafted.pth"))
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    torch.save({"state_dict": arrays}, tmp_path / "numpy.pth")
    with pytest.raises(ValueError, match="holds pickled objects, not tensors, under w"):
        interop.load_pth(str(tmp_path / "numpy.pth"))
    assert np.array_equal(interop.load_pth(str(tmp_path / "numpy.pth"), weights_only=False)["w"], arrays["w"])


def test_variables_of_another_network_are_named_not_converted():
    """A 3-class classifier's variables exported as a 5-class model's state dict with a (64, 3) fc, and a partial
    load that kept another width's init_variables (found only at apply, as a Flax shape error)."""
    x = jnp.zeros((1, 32, 32, 3))
    three, five = (models.make_model("resnet18", num_classes=n, **NARROW) for n in (3, 5))
    variables = jax.jit(lambda: three.init(jax.random.key(0), x, train=False))()
    with pytest.raises(ValueError, match=r"variables params/fc/kernel has shape \(64, 3\), but this ResNet's is "
                                         r"\(64, 5\): variables of another network\?"):
        interop.export_state_dict(five, variables)
    backbone = models.make_model("resnet18", **NARROW)
    partial = {k: v for k, v in interop.export_state_dict(three, variables).items() if not k.startswith("layer4")}
    wider = models.make_model("resnet18", **{**NARROW, "base_width": 2 * NARROW["base_width"]})
    other = jax.eval_shape(lambda: wider.init(jax.random.key(0), x, train=False))
    with pytest.raises(ValueError, match=r"init_variables params/layer4.0/conv1/kernel has shape \(3, 3, 64, 128\), "
                                         r"but this ResNet's is \(3, 3, 32, 64\)"):
        interop.import_state_dict(backbone, partial, strict=False, init_variables=other)


def test_reading_pth_files_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        interop.load_pth(str(tmp_path / "nowhere.pth"))
    with pytest.raises(TypeError, match="a checkpoint path must be a str or os.PathLike, got NoneType None"):
        interop.load_pth(None)
    keyed = tmp_path / "keyed.pth"
    torch.save({"w": torch.zeros(1), 3: torch.zeros(1)}, keyed)
    with pytest.raises(ValueError, match=r"does not hold a state dict: its keys are not all names, e.g. 3 \(int\)"):
        interop.load_pth(keyed)  # a Path works as well as a str
    foreign = tmp_path / "foreign.pth"  # an object where a tensor should be: named, not passed on as a weight
    torch.save({"state_dict": {"w": torch.zeros(1), "step": _Tripwire(), "steps": [torch.zeros(1), _Tripwire()]}},
               foreign)
    with pytest.raises(ValueError, match=r"foreign.pth': the state dict holds pickled objects, not tensors, under "
                                         r"step, steps \(of the classes or functions test_interop_models._ran\)"):
        interop.load_pth(str(foreign))
    unsafe = tmp_path / "pickled.pth"  # beyond what can be read without running it: why, in one plain line
    cfg = _Meta(a=1)
    cfg.note = "state, which its __setstate__ is given"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "cfg": cfg}, unsafe)
    with pytest.raises(ValueError) as caught:
        interop.load_pth(str(unsafe))
    message = str(caught.value)
    assert message.startswith(f"cannot read {str(unsafe)!r} without running code from it: ")
    assert "\x1b" not in message and "\n" not in message and "load_pth(" not in message, message
    assert "torch.save(torch.load(path, weights_only=False)['state_dict'], new_path)" in message
    assert _RAN == []
    assert set(interop.load_pth(str(unsafe), weights_only=False)) == {"w"}  # trusted: read as it is
    assert _RAN == ["setstate"]
    _RAN.clear()
    text = tmp_path / "notes.pth"  # not written by torch.save: named as such, not as an unpickling refusal
    text.write_text("hi\n")
    with pytest.raises(ValueError, match=r"notes.pth' is not a PyTorch checkpoint: .* this file starts with b'hi'"):
        interop.load_pth(str(text))
    not_sd = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_sd)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        interop.load_pth(str(not_sd))


def test_a_network_is_traced_once_for_its_conversions_and_each_caller_gets_its_own_copy(monkeypatch):
    """Import and export of equal networks share one trace (a ResNet-101's takes seconds); another width traces
    again; the constant buffers handed out (Swin's `relative_position_index`) are the caller's to change."""
    from cankd_jax.interop import torch_models

    traced = []
    original = torch_models._trace
    monkeypatch.setattr(torch_models, "_trace", lambda *a: traced.append(a[0]) or original(*a))
    swin = lambda width: models.make_model("swin_tiny", embed_dims=width, depths=(2, 2, 2, 2),  # noqa: E731
                                           num_heads=(1, 1, 1, 1))
    model = swin(13)  # a width no other test uses: not in the cache yet
    layout = interop.state_dict_layout(model)
    buffers = torch_models.torch_buffers(swin(13))
    assert len(traced) == 1
    key = next(k for k in buffers if k.endswith("relative_position_index"))
    expected = buffers[key].copy()
    buffers[key][...] = -1
    layout.clear()
    assert np.array_equal(torch_models.torch_buffers(model)[key], expected)
    assert len(interop.state_dict_layout(model)) > 0 and len(traced) == 1
    wider = interop.state_dict_layout(swin(14))
    assert len(traced) == 2 and wider != interop.state_dict_layout(model)


def test_networks_equal_field_by_field_but_sharing_a_layer_differently_get_their_own_layouts():
    """Flax compares modules by their fields' values: a block whose two fields hold one shared layer (one set of
    parameters) equals one whose fields hold two equal layers (two sets). Their layouts must not be confused."""
    import flax.linen as nn

    class Two(nn.Module):
        a: nn.Module
        b: nn.Module

        def __call__(self, x, train=False):
            return self.a(x) + self.b(x)

    sample = jax.ShapeDtypeStruct((1, 4), np.float32)
    layer = nn.Dense(3)
    shared, separate = Two(a=layer, b=layer), Two(a=nn.Dense(3), b=nn.Dense(3))
    assert shared == separate and hash(shared) == hash(separate)  # what the cache must see through
    assert sorted(interop.state_dict_layout(shared, sample=sample)) == ["a.bias", "a.weight"]
    assert sorted(interop.state_dict_layout(separate, sample=sample)) == ["a.bias", "a.weight", "b.bias", "b.weight"]
    assert sorted(interop.state_dict_layout(shared, sample=sample)) == ["a.bias", "a.weight"]
