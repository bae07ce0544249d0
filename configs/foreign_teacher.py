"""A teacher this project did not write: Hugging Face `transformers`' Flax ResNet (random weights), distilled into
our ResNet-18-d8 FCN on the built-in synthetic scenes at 32x32; 10 steps, under a minute on 2 CPU cores.

    python train.py --config configs/foreign_teacher.py --workdir /tmp/foreign

Both features are taken by module path, without touching either model (`cankd_jax.models.recorder`): the student's
last residual block `backbone/layer4.1` and the teacher's second stage `module/encoder/stages/1` (stride 8, as the
student's output-stride-8 layer4). `python -c "..."` with `cankd_jax.models.module_paths` lists a model's paths.
The teacher is the `transformers` module with its own conventions: `deterministic` (True at inference) for its
training flag, NHWC input to its Linen module. Needs `pip install transformers==4.57.6` (the test extra).
"""

import os

import ml_collections

from cankd_jax import config_arg


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config_arg.parse(arg, {}, {}, config="configs/foreign_teacher.py")
    c = config_arg.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "smoke.py"))  # its run, data, student
    c.teacher = ml_collections.ConfigDict(dict(
        name="foreign",
        factory="cankd_jax.models.foreign:transformers_module",
        factory_kwargs=dict(model="FlaxResNetModel", config=dict(
            embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic")),
        train_arg="deterministic", train_inverted=True,
        checkpoint="",  # a trained one: an Orbax directory from cankd_jax.models.save_foreign_variables
        random_init=True,  # the point is the machinery: a random teacher, on purpose
    ))
    c.distill = [ml_collections.ConfigDict(dict(
        name="stage", loss="cankd", student_feature="backbone/layer4.1", teacher_feature="module/encoder/stages/1",
        connector=32, weight=1.0, options=dict(in_channels=32, loss_weight=10.0),  # teacher stage 2: 32 channels
    ))]
    return c
