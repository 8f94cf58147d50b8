"""Object-store model catalog (fsspec/s3fs/pydantic only; never imports torch)."""
