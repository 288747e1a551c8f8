"""Diffusion features of labelled images, as Revelio reads them, cached on disk.

image -> VAE latent (latent_dist.mean * scaling_factor) -> DDPM noise at an integer
timestep t (the scheduler's `add_noise`) -> one denoiser forward, conditioned on the empty
prompt (or a given one; DiT: the null class) -> outputs of the requested blocks
(`core.revelio.block_outputs`) -> spatial mean -> `core.revelio.feature_cache` files.

Timesteps are integer DDPM timesteps 0..1000 (1000 = noise), Revelio's convention; the
emergence part of the project uses t = timestep / 1000 in [0, 1] instead. A model trained
on 1000 steps has timesteps 0..999, so t = 1000 is read as 999, its noisiest one.

Noise: image i gets one Gaussian draw from a generator seeded with (seed, i), the same at
every timestep and for every layer (all layers come from the same forward). Features of
an image therefore do not depend on the batch size, on which images share its batch, or
on an extraction being resumed.

    python -m core.revelio.features --preset tiny --images shapes/ --out cache/ \\
        --layers bottleneck up_ft1 --timesteps 25 200
"""

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel
from PIL import Image
from simple_parsing import field
from torch import Tensor, nn
from tqdm.auto import tqdm

from core.diffusion.pipelines import load_pipeline
from core.diffusion.presets import default_preset_name, get_preset
from core.revelio.block_outputs import capture, feature_layers, resolve_layers
from core.revelio.feature_cache import (
    FeatureMeta,
    feature_path,
    layer_name,
    load_meta,
    save_features,
    save_meta,
)
from core.runtime import command, default_device

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
UNET_LAYERS = ("bottleneck", "up_ft0", "up_ft1", "up_ft2")
DEFAULT_TIMESTEPS = (25,)
MAX_TIMESTEP = 1000
RUN_FIELDS = ("model", "classes", "labels", "images", "prompt", "seed", "resolution")
"""Meta fields that must match for a cache folder to be extended rather than refused."""


@dataclass
class LabelledImages:
    """Images with class labels, opened one at a time."""

    classes: list[str]
    labels: list[int]
    ids: list[str]
    """Path relative to the image folder, or `split/row` for a dataset."""
    open: Callable[[int], Image.Image]

    def __len__(self) -> int:
        return len(self.labels)


def image_folder(root: str | Path) -> LabelledImages:
    """Images under `root/<class>/` (searched recursively); classes are the sorted names."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder of class subfolders")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class subfolders; expected {root}/<class>/<image>")
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += found
        labels += [label] * len(found)
    if not paths:
        raise ValueError(
            f"the class subfolders of {root} hold no images ({', '.join(IMAGE_SUFFIXES)})"
        )
    return LabelledImages(
        classes,
        labels,
        [p.relative_to(root).as_posix() for p in paths],
        lambda i: Image.open(paths[i]),
    )


def hf_dataset(
    name: str, split: str = "train", image_column: str = "image", label_column: str = "label"
) -> LabelledImages:
    """A Hugging Face image dataset (Hub name or local folder, loaded with `datasets`)."""
    try:
        import datasets
    except ImportError as error:
        raise ValueError(
            "reading a Hugging Face dataset needs the `datasets` package (pip install datasets); "
            "a folder of class subfolders (--images) needs nothing more"
        ) from error
    return dataset_images(
        datasets.load_dataset(name, split=split), split, image_column, label_column
    )


def dataset_images(dataset, split: str, image_column: str, label_column: str) -> LabelledImages:
    """Wrap a loaded `datasets.Dataset` whose labels are a `ClassLabel` column."""
    for column in (image_column, label_column):
        if column not in dataset.features:
            have = ", ".join(dataset.features)
            raise ValueError(f"the dataset has no column {column!r}; its columns are: {have}")
    names = getattr(dataset.features[label_column], "names", None)
    if names is None:
        raise ValueError(f"the dataset's column {label_column!r} is not a ClassLabel")
    labels = [int(label) for label in dataset[label_column]]
    ids = [f"{split}/{i}" for i in range(len(labels))]
    return LabelledImages(list(names), labels, ids, lambda i: dataset[i][image_column])


def pixels(image: Image.Image, resolution: int) -> Tensor:
    """[3, resolution, resolution] in [-1, 1]: shorter side resized (bicubic), centre crop."""
    image = image.convert("RGB")
    if image.size != (resolution, resolution):
        scale = resolution / min(image.size)
        size = [max(resolution, round(side * scale)) for side in image.size]
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def check_timesteps(timesteps: Iterable[int]) -> list[int]:
    """Distinct timesteps, sorted; each must be an integer in 0..1000."""
    checked = set()
    for t in timesteps:
        if isinstance(t, bool) or int(t) != t or not 0 <= t <= MAX_TIMESTEP:
            raise ValueError(f"timestep {t!r} is not an integer in 0..{MAX_TIMESTEP}")
        checked.add(int(t))
    if not checked:
        raise ValueError("no timesteps given")
    return sorted(checked)


def image_noise(shape: Sequence[int], seed: int, indices: Iterable[int]) -> Tensor:
    """[len(indices), *shape] standard normal noise, row j seeded with (seed, indices[j])."""
    rows = []
    for index in indices:
        state = int(np.random.SeedSequence((seed, index)).generate_state(1)[0])
        rows.append(torch.randn(tuple(shape), generator=torch.Generator().manual_seed(state)))
    return torch.stack(rows)


def pool(maps: Tensor) -> Tensor:
    """Spatial mean of [B, C, H, W] maps: [B, C] float32."""
    return maps.float().mean(dim=(-2, -1))


class FeatureExtractor:
    """Block outputs of a U-Net (text-conditioned) or DiT (class-conditioned) denoiser."""

    def __init__(
        self,
        denoiser: nn.Module,
        vae: nn.Module,
        scheduler=None,
        *,
        condition: Tensor | None = None,
        prompt: str = "",
        resolution: int | None = None,
        seed: int = 0,
        model: str = "",
    ):
        """`condition` is the text embedding [1, tokens, dim] for a U-Net; a DiT gets the
        null class when it is None. `scheduler` defaults to DDPM's linear schedule."""
        self.denoiser = denoiser
        self.vae = vae
        self.scheduler = scheduler if scheduler is not None else DDPMScheduler()
        self.is_dit = isinstance(denoiser, DiTTransformer2DModel)
        if condition is None:
            if not self.is_dit:
                raise ValueError("a U-Net needs a text embedding as its condition")
            condition = torch.tensor([denoiser.config.num_embeds_ada_norm])
        elif not self.is_dit:
            condition = condition.to(denoiser.dtype)
        self.condition = condition.to(denoiser.device)
        self.prompt = prompt
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.resolution = resolution or denoiser.config.sample_size * scale
        self.seed = seed
        self.model = model or type(denoiser).__name__

    @classmethod
    def from_pipeline(cls, pipe, *, prompt: str = "", **kwargs) -> "FeatureExtractor":
        """From a Stable Diffusion pipeline (the prompt encoded once) or a DiT pipeline."""
        kwargs.setdefault("model", getattr(pipe, "name_or_path", None) or type(pipe).__name__)
        if hasattr(pipe, "transformer"):
            if prompt:
                raise ValueError("DiT features are read with the null class; drop the prompt")
            return cls(pipe.transformer, pipe.vae, pipe.scheduler, **kwargs)
        with torch.no_grad():
            embedding = pipe.encode_prompt(
                prompt, pipe.unet.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )[0]
        return cls(
            pipe.unet, pipe.vae, pipe.scheduler, condition=embedding, prompt=prompt, **kwargs
        )

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def layers(self, layers: Iterable[str] | None = None) -> list[str]:
        """Module paths of `layers` (checked); by default Revelio's four U-Net layers or,
        for a DiT, every transformer block."""
        if layers is None:
            layers = feature_layers(self.denoiser) if self.is_dit else UNET_LAYERS
        paths = [layer_name(layer) for layer in resolve_layers(self.denoiser, layers)]
        return list(dict.fromkeys(paths))

    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image]) -> Tensor:
        """VAE latents [B, 4, h, w] of images (mean of the latent distribution, scaled)."""
        batch = torch.stack([pixels(image, self.resolution) for image in images])
        batch = batch.to(self.vae.device, self.vae.dtype)
        latents = self.vae.encode(batch).latent_dist.mean * self.vae.config.scaling_factor
        return latents.to(self.denoiser.dtype)

    @torch.no_grad()
    def block_maps(
        self, latents: Tensor, timestep: int, layers: Iterable[str], indices: Sequence[int]
    ) -> dict[str, Tensor]:
        """[B, C, H, W] outputs of `layers` for latents of images `indices`, noised at
        `timestep`, from one forward that stops after the last of them."""
        latents = latents.to(self.denoiser.device, self.denoiser.dtype)
        noise = image_noise(latents.shape[1:], self.seed, indices).to(latents)
        level = min(int(timestep), self.num_train_timesteps - 1)
        t = torch.full((len(latents),), level, dtype=torch.long, device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        return capture(self.denoiser, layers, lambda: self._forward(noisy, t))

    def _forward(self, noisy: Tensor, t: Tensor):
        batch = len(noisy)
        if self.is_dit:
            return self.denoiser(noisy, timestep=t, class_labels=self.condition.expand(batch))
        condition = self.condition.expand(batch, -1, -1)
        return self.denoiser(noisy, t, encoder_hidden_states=condition)

    def features_at(
        self,
        latents: Tensor,
        timestep: int,
        layers: Sequence[str],
        *,
        batch_size: int = 8,
        maps: bool = False,
        first_index: int = 0,
    ) -> dict[str, dict[str, Tensor]]:
        """{layer: {"pooled": [N, C] float32, "maps": [N, C, H, W] float16}} on the CPU, for
        latents of images first_index, first_index + 1, ...; "maps" only when asked."""
        parts = {layer: {"pooled": [], "maps": []} for layer in layers}
        for start in range(0, len(latents), batch_size):
            indices = range(
                first_index + start, first_index + min(start + batch_size, len(latents))
            )
            found = self.block_maps(latents[start : start + batch_size], timestep, layers, indices)
            for layer in layers:
                parts[layer]["pooled"].append(pool(found[layer]).cpu())
                if maps:
                    parts[layer]["maps"].append(found[layer].to("cpu", torch.float16))
        return {
            layer: {kind: torch.cat(rows) for kind, rows in kinds.items() if rows}
            for layer, kinds in parts.items()
        }

    def meta(self, images: LabelledImages) -> FeatureMeta:
        """The cache description of a run over `images`, before any layer is written."""
        return FeatureMeta(
            model=self.model,
            layers=[],
            timesteps=[],
            classes=list(images.classes),
            labels=list(images.labels),
            images=list(images.ids),
            prompt=self.prompt,
            seed=self.seed,
            resolution=self.resolution,
            extra={
                "denoiser": type(self.denoiser).__name__,
                "scheduler": type(self.scheduler).__name__,
                "condition": "null class" if self.is_dit else "text",
            },
        )

    def extract(
        self,
        images: LabelledImages,
        cache: str | Path,
        layers: Iterable[str] | None = None,
        timesteps: Iterable[int] = DEFAULT_TIMESTEPS,
        *,
        batch_size: int = 8,
        maps: bool = False,
        overwrite: bool = False,
        progress: bool = False,
    ) -> list[Path]:
        """Write pooled (and, with `maps`, unpooled) features of every layer and timestep.

        (layer, timestep) files already in `cache` are kept unless `overwrite`; a cache of
        another run (other model, images, prompt, seed or resolution) is refused. Latents
        are encoded once; each timestep is written as soon as it is done, so an interrupted
        run resumes from the first missing timestep. Returns the files written.
        """
        layers, timesteps = self.layers(layers), check_timesteps(timesteps)
        if batch_size < 1:
            raise ValueError(f"the batch size must be at least 1, got {batch_size}")
        if len(images) == 0:
            raise ValueError("no images to extract features from")
        meta = _resumable_meta(cache, self.meta(images))
        kinds = ("pooled", "maps") if maps else ("pooled",)
        todo = {
            t: missing
            for t in timesteps
            if (missing := _missing(cache, layers, t, kinds, overwrite))
        }
        if not todo:
            return []
        latents = self._encode_all(images, batch_size, progress)
        written = []
        for t, missing in tqdm(todo.items(), desc="timesteps", disable=not progress):
            found = self.features_at(latents, t, missing, batch_size=batch_size, maps=maps)
            for layer in missing:
                written += [
                    save_features(cache, layer, t, found[layer][kind], kind) for kind in kinds
                ]
            meta.layers += [layer for layer in missing if layer not in meta.layers]
            meta.timesteps = sorted(set(meta.timesteps) | {t})
            save_meta(cache, meta)
        return written

    def _encode_all(self, images: LabelledImages, batch_size: int, progress: bool) -> Tensor:
        latents = []
        for start in tqdm(range(0, len(images), batch_size), desc="encode", disable=not progress):
            batch = [images.open(i) for i in range(start, min(start + batch_size, len(images)))]
            latents.append(self.encode(batch).cpu())
        return torch.cat(latents)


def _resumable_meta(cache: str | Path, meta: FeatureMeta) -> FeatureMeta:
    """`meta` with the layers and timesteps already in `cache`; refuses another run's cache."""
    try:
        previous = load_meta(cache)
    except FileNotFoundError:
        return meta
    differ = [name for name in RUN_FIELDS if getattr(previous, name) != getattr(meta, name)]
    if differ:
        raise ValueError(
            f"{cache} holds features of another run (its {', '.join(differ)} differ); "
            "use another cache folder or remove that one"
        )
    return FeatureMeta(
        **{**asdict(meta), "layers": previous.layers, "timesteps": previous.timesteps}
    )


def _missing(cache, layers: Sequence[str], t: int, kinds: Sequence[str], overwrite: bool) -> list:
    if overwrite:
        return list(layers)
    return [
        layer
        for layer in layers
        if not all(feature_path(cache, layer, t, kind).is_file() for kind in kinds)
    ]


@dataclass
class FeaturesConfig:
    """Settings of `python -m core.revelio.features`."""

    out: Path
    """Cache folder."""
    images: Path | None = None
    """Folder of class subfolders of images (or give --dataset)."""
    dataset: str | None = None
    """Hugging Face image dataset (needs `datasets`; or give --images)."""
    split: str = "train"
    """Dataset split (with --dataset)."""
    preset: str | None = None
    """Preset giving the model and resolution (default: toy if its weights are here, else tiny)."""
    model: str | None = None
    """Pipeline folder or Hub id (overrides the preset's)."""
    layers: tuple[str, ...] | None = None
    """Block names or aliases (default: bottleneck up_ft0..2; DiT: all)."""
    timesteps: tuple[int, ...] = DEFAULT_TIMESTEPS
    """Integer timesteps 0..1000."""
    prompt: str = ""
    """Text condition (default: the empty prompt)."""
    maps: bool = False
    """Also cache unpooled maps (fp16, big)."""
    batch_size: int = 8
    """Images per forward."""
    resolution: int | None = None
    """Image side (default: the preset's, else the model's)."""
    seed: int = 0
    """Seed of the added noise."""
    overwrite: bool = False
    """Recompute files already cached."""
    device: str = field(default_factory=default_device)
    """Torch device."""

    def __post_init__(self) -> None:
        if (self.images is None) == (self.dataset is None):
            raise ValueError(
                "give the labelled images as --images FOLDER or as --dataset NAME, one of the two"
            )


def cache_features(config: FeaturesConfig) -> list[Path]:
    """Extract the features the config asks for into its cache folder; the files written."""
    check_timesteps(config.timesteps)
    if config.images is not None:
        images = image_folder(config.images)
    else:
        images = hf_dataset(config.dataset, config.split)
    preset = get_preset(config.preset or default_preset_name())
    resolution = config.resolution or (None if config.model else preset.resolution)
    if config.model:
        preset = get_preset(preset.name, model=config.model)
    pipe = load_pipeline(preset, device=config.device)
    extractor = FeatureExtractor.from_pipeline(
        pipe, prompt=config.prompt, resolution=resolution, seed=config.seed, model=preset.model
    )
    written = extractor.extract(
        images,
        config.out,
        config.layers,
        config.timesteps,
        batch_size=config.batch_size,
        maps=config.maps,
        overwrite=config.overwrite,
        progress=True,
    )
    print(f"{len(images)} images, {len(written)} files written to {config.out}")
    return written


main = command(FeaturesConfig, cache_features, "python -m core.revelio.features", __doc__)

if __name__ == "__main__":
    sys.exit(main())
