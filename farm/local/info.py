"""How to reach a running local stack: its URLs, credentials and the FARM_* variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StackInfo:
    """How to reach a running local stack."""

    data_dir: Path
    redis_url: str
    database_url: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    s3_bucket: str
    console_password: str | None = None  # basic auth of Flower, farm ui and metrics
    tls_ca: Path | None = None  # the CA of the TLS front (`farm up --listen`), when it runs

    def env(self) -> dict[str, str]:
        """The ``FARM_*`` variables that point the farm at this stack."""
        return {
            "FARM_BROKER_URL": self.redis_url,
            "FARM_REDIS_URL": self.redis_url,
            "FARM_DATABASE_URL": self.database_url,
            "FARM_STORAGE": "s3",
            "FARM_S3_ENDPOINT": self.s3_endpoint,
            "FARM_S3_BUCKET": self.s3_bucket,
            "FARM_S3_ACCESS_KEY": self.s3_access_key,
            "FARM_S3_SECRET_KEY": self.s3_secret_key,
            "FARM_DATA_DIR": str(self.data_dir),
            **({"FARM_FLOWER_PASSWORD": self.console_password} if self.console_password else {}),
            **({"FARM_S3_CA_BUNDLE": str(self.tls_ca)} if self.tls_ca else {}),
        }
