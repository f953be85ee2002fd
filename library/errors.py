"""Which exceptions are the user's to fix (reported as one line) rather than bugs (reported with a traceback)."""

from __future__ import annotations


def user_error_types() -> tuple[type[BaseException], ...]:
    from library.data.captions import CaptionFileError
    from library.data.config_schema import DatasetConfigError
    from library.data.dataset_scan import UnreadableImagesError
    from library.data.images import ImageReadError
    from library.data.latent_cache import LatentCacheError
    from library.models.attention import AttentionBackendError
    from library.models.checkpoint_io import UnsafeCheckpointError
    from library.models.loading import ModelLoadError

    return (
        ModelLoadError, UnsafeCheckpointError, AttentionBackendError,
        CaptionFileError, DatasetConfigError, ImageReadError, LatentCacheError,
        UnreadableImagesError, FileNotFoundError,
    )


def is_user_error(err: BaseException) -> bool:
    return isinstance(err, user_error_types())
