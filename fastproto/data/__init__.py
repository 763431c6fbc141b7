"""Datasets, preprocessing and the synthetic MVTec-layout generator.

``build_dataset("mvtec:/data/mvtec", split="train")`` (formats ``mvtec|mpdd|btad|visa|visa_raw|realiad``),
``list_categories(spec)``, ``collate`` for DataLoaders, ``fewshot_expand`` for INP-Former's few-shot
setting, ``Preprocess`` (resize 448 -> centre crop 392 -> ImageNet normalisation by default) and
``synthetic.generate(root)`` for a procedural dataset with exact masks. RGB-D (:mod:`fastproto.data.rgbd`):
``MVTec3DDataset`` / ``EyecandiesDataset`` (samples add ``"depth"``) and ``generate_rgbd(root)``.
"""
from fastproto.data import synthetic
from fastproto.data.datasets import (
    FORMATS,
    AnomalyDataset,
    BadFileError,
    FewShotDataset,
    MVTecDataset,
    RealIADDataset,
    Record,
    VisARawDataset,
    build_dataset,
    collate,
    fewshot_expand,
    list_categories,
)
from fastproto.data.rgbd import (
    EyecandiesDataset,
    MVTec3DDataset,
    RGBDDataset,
    generate_rgbd,
)
from fastproto.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    binarize_mask,
)

__all__ = [
    "FORMATS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AnomalyDataset",
    "BadFileError",
    "EyecandiesDataset",
    "FewShotDataset",
    "MVTec3DDataset",
    "MVTecDataset",
    "Preprocess",
    "RGBDDataset",
    "RealIADDataset",
    "Record",
    "VisARawDataset",
    "binarize_mask",
    "build_dataset",
    "collate",
    "fewshot_expand",
    "generate_rgbd",
    "list_categories",
    "synthetic",
]
