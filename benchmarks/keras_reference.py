"""The article's Keras pipeline, re-created as the speed reference: images/s and the 5-epoch projection.

    pip install -e '.[bench]'        # tensorflow-cpu; never a dependency of xferlearn itself
    python benchmarks/keras_reference.py [DATA] [--steps 10] [--warmup 2] [--images N] [--json PATH]

The article's model and data pipeline, unchanged apart from the weights:

    vgg = VGG16(input_shape=[224, 224, 3], weights='imagenet', include_top=False)
    for layer in vgg.layers: layer.trainable = False
    x = Flatten()(vgg.output); prediction = Dense(len(folders), activation='softmax')(x)
    model.compile(loss='categorical_crossentropy', optimizer='adam', metrics=['accuracy'])
    ImageDataGenerator(rescale=1./255, shear_range=0.2, zoom_range=0.2, horizontal_flip=True)
        .flow_from_directory(DATA, target_size=(224, 224), batch_size=32, class_mode='categorical')
    model.fit(training_set, epochs=5, steps_per_epoch=len(training_set), ...)

Offline, VGG16's ImageNet weights cannot be had, so VGG16 starts from `weights=None` (random
initialisation): the computation per image is the same. The run is `model.fit` itself, for
`warmup + steps` steps; a callback stamps the end of every step, and images/s comes from the
`steps` after the warm-up (tracing and graph building happen in the first step). TensorFlow keeps
its default threading (all the cores it sees), as a user running the article would have it.

ImageDataGenerator is gone from Keras 3's public API. In order of preference this uses:
`tf_keras` (Keras 2, where installed: the article's API exactly), Keras's own
`keras.preprocessing.image.ImageDataGenerator` where still public, the same class kept in
Keras 3 at `keras.src.legacy.preprocessing.image`, and last the closest equivalent in Keras 3
layers (`image_dataset_from_directory` + Rescaling, RandomShear, RandomZoom, RandomFlip). It
says which in its output; `--pipeline layers` forces the last.

The projection is training steps only: 5 epochs x N images / (images/s). The article also ran
its 624-image test set through the model after every epoch, and model building and start-up
take a little more (printed as setup), so the projection is, if anything, in Keras's favour.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from machine import cpu_model  # benchmarks/machine.py: scripts here import their neighbours

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter; speed is unaffected

STARTED = time.perf_counter()
SHARED_TRAIN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chest_xray_224" / "train"
IMAGE_SIZE = (224, 224)
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".gif"}  # what flow_from_directory lists
# ImageDataGenerator's shear_range is an angle in degrees; RandomShear's factor is the share of
# the image a pixel moves across, tan(angle).
ARTICLE_SHEAR_DEGREES = 0.2


def import_keras():
    """(keras module, name of the Keras flavour): tf_keras (Keras 2) where installed, else Keras 3."""
    try:
        import tf_keras as keras
        return keras, f"tf_keras {keras.__version__} (Keras 2)"
    except ImportError:
        import keras
        return keras, f"keras {keras.__version__}"


def image_data_generator(keras):
    """The ImageDataGenerator class and where it came from, or (None, reason) where there is none."""
    try:
        return keras.preprocessing.image.ImageDataGenerator, f"{keras.__name__}.preprocessing.image.ImageDataGenerator"
    except AttributeError:
        pass
    try:
        from keras.src.legacy.preprocessing.image import ImageDataGenerator
        return ImageDataGenerator, ("keras.src.legacy.preprocessing.image.ImageDataGenerator (Keras 3 keeps the "
                                    "Keras 2 class there, out of its public API)")
    except ImportError as error:
        return None, f"no ImageDataGenerator in this Keras ({error})"


def article_model(keras, num_classes: int):
    vgg = keras.applications.VGG16(input_shape=[*IMAGE_SIZE, 3], weights=None, include_top=False)
    for layer in vgg.layers:
        layer.trainable = False
    x = keras.layers.Flatten()(vgg.output)
    prediction = keras.layers.Dense(num_classes, activation="softmax")(x)
    model = keras.Model(inputs=vgg.input, outputs=prediction)
    model.compile(loss="categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    return model


def generator_pipeline(generator_class, data: Path, batch_size: int):
    datagen = generator_class(rescale=1.0 / 255, shear_range=ARTICLE_SHEAR_DEGREES, zoom_range=0.2,
                              horizontal_flip=True)
    training_set = datagen.flow_from_directory(str(data), target_size=IMAGE_SIZE, batch_size=batch_size,
                                               class_mode="categorical")
    return training_set, training_set.num_classes


def layers_pipeline(keras, data: Path, batch_size: int):
    """Keras 3's own route to the same augmentation, applied on the fly in tf.data as its guides do.
    zoom_range=0.2 is [0.8, 1.2] per axis, drawn independently, edges filled with the nearest pixel."""
    import tensorflow as tf

    dataset = keras.utils.image_dataset_from_directory(str(data), image_size=IMAGE_SIZE, batch_size=batch_size,
                                                       label_mode="categorical", shuffle=True)
    num_classes = len(dataset.class_names)
    shear = math.tan(math.radians(ARTICLE_SHEAR_DEGREES))
    augment = keras.Sequential([
        keras.layers.Rescaling(1.0 / 255),
        keras.layers.RandomShear(x_factor=shear, fill_mode="nearest"),
        keras.layers.RandomZoom(height_factor=(-0.2, 0.2), width_factor=(-0.2, 0.2), fill_mode="nearest"),
        keras.layers.RandomFlip("horizontal"),
    ])
    dataset = dataset.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.repeat().prefetch(tf.data.AUTOTUNE), num_classes


def batch_size_at(index: int, images: int, batch_size: int) -> int:
    """Images in batch `index` of one pass over `images` images (Keras's batches wrap every pass)."""
    index %= math.ceil(images / batch_size)
    return min(batch_size, images - index * batch_size)


def count_images(data: Path) -> int:
    return sum(1 for d in data.iterdir() if d.is_dir()
               for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def run(args) -> dict:
    data = Path(args.data)
    if not data.is_dir():
        sys.exit(f"keras_reference: no such data folder: {data}")
    try:
        keras, flavour = import_keras()
    except ImportError:
        sys.exit("keras_reference: TensorFlow is not installed: pip install -e '.[bench]' (tensorflow-cpu)")
    import tensorflow as tf

    generator_class, source = image_data_generator(keras) if args.pipeline != "layers" else (None, "forced")
    if generator_class is None and args.pipeline == "generator":
        sys.exit(f"keras_reference: --pipeline generator, but {source}")
    if generator_class is not None:
        training_set, num_classes = generator_pipeline(generator_class, data, args.batch_size)
        pipeline = f"ImageDataGenerator: {source}"
    else:
        if not hasattr(keras.layers, "RandomShear"):
            sys.exit(f"keras_reference: {source}, and this Keras has no RandomShear layer either")
        training_set, num_classes = layers_pipeline(keras, data, args.batch_size)
        why = "--pipeline layers" if source == "forced" else source
        pipeline = (f"Keras 3 layers, not ImageDataGenerator ({why}): image_dataset_from_directory + Rescaling(1/255), "
                    f"RandomShear(tan {ARTICLE_SHEAR_DEGREES} deg), RandomZoom(0.2, 0.2), RandomFlip('horizontal')")

    model = article_model(keras, num_classes)
    step_ends: list[float] = []

    class StepClock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            step_ends.append(time.perf_counter())

    # A tf.data pipeline shuffles itself (image_dataset_from_directory); fit's shuffle flag would only warn.
    shuffle = {} if generator_class is not None else {"shuffle": False}
    # A Keras 3 generator stops at the end of its data rather than cycling: a folder smaller than
    # the steps asked for is run for as many whole epochs as it takes, and every step is timed.
    wanted = args.warmup + args.steps
    per_epoch = min(wanted, len(training_set)) if generator_class is not None else wanted
    epochs = math.ceil(wanted / per_epoch)
    fit_started = time.perf_counter()
    model.fit(training_set, epochs=epochs, steps_per_epoch=per_epoch, callbacks=[StepClock()], verbose=0, **shuffle)
    if len(step_ends) != epochs * per_epoch:
        sys.exit(f"keras_reference: expected {epochs * per_epoch} step callbacks, got {len(step_ends)}")
    boundaries = [fit_started, *step_ends]
    durations = [b - a for a, b in zip(boundaries, boundaries[1:])]
    window = sum(durations[args.warmup:])
    timed_steps = len(durations) - args.warmup
    found = training_set.samples if generator_class is not None else count_images(data)
    # The last batch of a pass over the data is short where the batch size does not divide it.
    passes_every = per_epoch if generator_class is not None else len(durations)
    sizes = [batch_size_at(step % passes_every, found, args.batch_size) for step in range(len(durations))]
    images_per_s = sum(sizes[args.warmup:]) / window
    images = args.images or found
    projected = args.epochs * images / images_per_s
    return {
        "command": shlex.join([sys.executable, *sys.argv]),
        "data": str(data),
        "pipeline": pipeline,
        "model": "VGG16(include_top=False, weights=None), all its layers frozen + Flatten + Dense(softmax); "
                 "Adam, categorical cross-entropy",
        "batch_size": args.batch_size,
        "warmup_steps": args.warmup,
        "timed_steps": timed_steps,
        "timed_images": sum(sizes[args.warmup:]),
        "timed_s": window,
        "step_s": durations[args.warmup:],
        "setup_s": fit_started - STARTED,
        "warmup_s": sum(durations[:args.warmup]),
        "images_per_s": images_per_s,
        "projection_images": images,
        "projection_epochs": args.epochs,
        "projected_s": projected,
        "versions": {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": flavour,
                     "numpy": __import__("numpy").__version__},
        "machine": {"cpu": cpu_model(), "os_cpu_count": os.cpu_count(),
                    "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                    "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
                    "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
                    "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None},
    }


def fmt_load(load) -> str:
    return "unknown" if load is None else " ".join(f"{x:.2f}" for x in load)


def report(result: dict) -> str:
    m, v = result["machine"], result["versions"]
    steps = ", ".join(f"{s:.2f}" for s in result["step_s"])
    return "\n".join([
        "Keras reference: the article's pipeline (VGG16 at 224, frozen base + Dense softmax head)",
        f"  command:    {result['command']}",
        f"  versions:   TensorFlow {v['tensorflow']}, {v['keras']}, Python {v['python']}, NumPy {v['numpy']}",
        f"  machine:    {m['cpu']}, {m['usable_cores']} usable cores; TensorFlow threads intra "
        f"{m['tf_intra_op_threads']}, inter {m['tf_inter_op_threads']} (0 = TensorFlow's default: all cores); "
        f"load average at the end {fmt_load(m['load_average'])}",
        f"  data:       {result['data']}",
        f"  pipeline:   {result['pipeline']}",
        f"  model:      {result['model']}",
        f"  set-up:     {result['setup_s']:.1f} s (imports, data listing, model); warm-up: {result['warmup_steps']} "
        f"steps in {result['warmup_s']:.1f} s",
        f"  timed:      {result['timed_steps']} steps, {result['timed_images']} images (batches of "
        f"{result['batch_size']}) in {result['timed_s']:.1f} s "
        f"(per step: {steps})",
        f"  speed:      {result['images_per_s']:.2f} images/s",
        f"  projection: {result['projection_epochs']} epochs x {result['projection_images']} images = "
        f"{result['projected_s']:.0f} s ({result['projected_s'] / 60:.1f} min), training steps only "
        "(the article's per-epoch test-set pass and the set-up are left out)",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="?", default=str(SHARED_TRAIN), help="a folder of class folders "
                        "(default: ../shared/data/chest_xray_224/train)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    parser.add_argument("--batch-size", type=int, default=32, help="(default: 32, the article's)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs in the projection (default: 5, the article's)")
    parser.add_argument("--images", type=int, help="images per epoch in the projection (default: those in DATA)")
    parser.add_argument("--pipeline", choices=("auto", "generator", "layers"), default="auto",
                        help="auto: ImageDataGenerator where this Keras has it, else Keras 3 layers")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.epochs < 1:
        parser.error("--steps, --batch-size and --epochs must be at least 1, --warmup at least 0")
    result = run(args)
    print(report(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
