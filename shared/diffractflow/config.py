"""Platform settings, one place: environment variables (``DIFFRACTFLOW_*``) over an optional YAML file.

Secrets (the NATS password) can come from a file (``DIFFRACTFLOW_NATS_PASSWORD_FILE``) and are
never logged: they are ``SecretStr`` and print as ``**********``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class _YamlSource(PydanticBaseSettingsSource):
    """Values from the YAML file named by DIFFRACTFLOW_CONFIG (lowest priority after defaults)."""

    def get_field_value(self, field, field_name):  # pragma: no cover - required by the ABC
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("DIFFRACTFLOW_CONFIG")
        if not path:
            return {}
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"DIFFRACTFLOW_CONFIG names {p}, which does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{p}: expected a mapping of settings")
        return data


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DIFFRACTFLOW_", extra="ignore")

    nats_url: str = "nats://127.0.0.1:4222"
    nats_user: str | None = None
    nats_password: SecretStr | None = None
    nats_password_file: Path | None = None
    volume: Path = Path("./volume")

    # worker behaviour
    concurrency: int = Field(1, ge=1, le=64)
    ack_wait_s: float = Field(30.0, gt=0)
    max_deliver: int = Field(3, ge=1)
    max_ack_pending: int = Field(64, ge=1)
    nak_delay_s: float = Field(2.0, ge=0)
    shutdown_grace_s: float = Field(20.0, ge=0)
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _password_from_file(self):
        if self.nats_password is None and self.nats_password_file:
            self.nats_password = SecretStr(Path(self.nats_password_file).read_text().strip())
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        return (init_settings, env_settings, _YamlSource(settings_cls), file_secret_settings)

    def nats_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"servers": [self.nats_url]}
        if self.nats_user:
            opts["user"] = self.nats_user
            opts["password"] = self.nats_password.get_secret_value() if self.nats_password else ""
        return opts


def load_settings(**overrides: Any) -> Settings:
    return Settings(**overrides)
