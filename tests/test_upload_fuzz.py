"""Arbitrary multipart bodies and headers never make the upload route answer 5xx."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparrow.api import create_app
from sparrow.settings import Settings

PARTS = [
    b"--b\r\n",
    b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n',
    b'Content-Disposition: form-data; name="title"\r\n',
    b"Content-Disposition: form-data\r\n",
    b"Content-Type: audio/wav\r\n",
    b"\r\n",
    b"RIFF\x24\x00\x00\x00WAVEfmt ",
    b"\r\n--b--\r\n",
    b"--b--",
]

bodies = st.one_of(
    st.binary(max_size=512),
    st.lists(st.sampled_from(PARTS) | st.binary(max_size=40), max_size=12).map(b"".join),
)
content_types = st.sampled_from(
    [
        "multipart/form-data; boundary=b",
        "multipart/form-data; boundary=",
        "multipart/form-data",
        "multipart/form-data; boundary=" + "x" * 300,
        'multipart/form-data; boundary="b"; charset=utf-16',
        "application/json",
        "",
    ]
)


def test_random_uploads_never_answer_5xx(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, max_upload_mb=0.01))
    with TestClient(app) as client:

        @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(body=bodies, content_type=content_types)
        def check(body: bytes, content_type: str) -> None:
            response = client.post(
                "/api/chains", content=body, headers={"content-type": content_type}
            )
            assert response.status_code < 500, (body, content_type, response.text)
            if response.status_code >= 400:
                assert set(response.json()) == {"error", "detail"}

        check()
        assert list((tmp_path / "tmp").iterdir()) == []
