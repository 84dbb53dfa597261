"""Credentials never reach what tracking code shows: :func:`tasks.tracking.redact_uri`."""

from __future__ import annotations

import pytest

from tasks import tracking


@pytest.mark.parametrize(("uri", "shown"), [
    ("postgresql://u:p@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("postgresql+psycopg2://lsq:s3cr@t@db.internal:5432/mlflow",
     "postgresql+psycopg2://lsq:***@db.internal:5432/mlflow"),
    ("postgresql://u:pa/ss@h/db", "postgresql://u:***@h/db"),  # SQLAlchemy takes a "/" in a password
    ("mysql+pymysql://root:hunter2@localhost/mlflow?charset=utf8",
     "mysql+pymysql://root:***@localhost/mlflow?charset=utf8"),
    ("http://u:p@host/", "http://u:***@host/"),
    ("https://user:tok@mlflow.example.com:443/api", "https://user:***@mlflow.example.com:443/api"),
    ("https://user@mlflow.example.com", "https://user@mlflow.example.com"),  # no password: nothing to hide
    ("http://mlflow:5000", "http://mlflow:5000"),
    ("s3://bucket/mlflow/artifacts", "s3://bucket/mlflow/artifacts"),
    ("s3://AKIDEXAMPLE:wJalrXUtnFEMI@bucket/path", "s3://AKIDEXAMPLE:***@bucket/path"),
    ("sqlite:///relative/mlflow.db", "sqlite:///relative/mlflow.db"),
    ("sqlite:////abs/path/mlruns/mlflow.db", "sqlite:////abs/path/mlruns/mlflow.db"),
    ("sqlite:///mlflow.db?timeout=20", "sqlite:///mlflow.db?timeout=20"),
    ("/work/mlruns", "/work/mlruns"),
    ("file:///work/mlruns", "file:///work/mlruns"),
    ("postgresql://h/db?password=x", "postgresql://h/db?password=***"),
    ("postgresql://h/db?user=u&password=x&sslmode=require", "postgresql://h/db?user=u&password=***&sslmode=require"),
    ("https://h/api?token=abc&x=1#frag", "https://h/api?token=***&x=1#frag"),
    ("https://acct.blob.core.windows.net/c?sv=2020&sig=abc%2F", "https://acct.blob.core.windows.net/c?sv=2020&sig=***"),
    ("", ""),
])
def test_redact_uri(uri, shown):
    assert tracking.redact_uri(uri) == shown


def test_redact_uri_is_idempotent_and_takes_none():
    once = tracking.redact_uri("postgresql://u:p@h/db?password=x")
    assert tracking.redact_uri(once) == once
    assert tracking.redact_uri(None) == ""
