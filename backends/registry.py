"""A client of the OCI distribution API: manifests and blobs from a registry, with auth.

HTTP is `requests`' (connection reuse, redirects to blob storage that drop the Authorization
header when they leave the registry's host, proxies, the system's CA bundle). Written here is only
what no library does for the distribution API: the Accept header every manifest type needs, the
bearer-token challenge, and checking each answer against its digest.

Plain HTTP is used only for a loopback registry (127.0.0.0/8, ::1, localhost) or one named with
`insecure`; otherwise TLS with verification.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from microvmc.backends.blobs import BlobStore
from microvmc.compiler.ociimage import MANIFEST_ACCEPT, Descriptor, ImageError, Reference, sha256_digest
from microvmc.errors import MicrovmcError

__all__ = ["RegistryClient", "RegistryError", "credentials_for", "is_loopback", "auth_files"]

TIMEOUT = (10, 60)  # connect, read: seconds
CHUNK = 1 << 16


class RegistryError(MicrovmcError):
    """The registry refused, could not be reached, or sent something unusable."""


def is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:host.index("]")]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def auth_files(environ: Mapping[str, str]) -> list[Path]:
    """Where podman, skopeo and docker keep registry credentials, in the order they look."""
    home = Path(environ.get("HOME") or os.path.expanduser("~"))
    files = []
    if environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(environ["REGISTRY_AUTH_FILE"]))
    if environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(environ["XDG_RUNTIME_DIR"], "containers", "auth.json"))
    files.append(Path(environ.get("XDG_CONFIG_HOME") or home / ".config", "containers", "auth.json"))
    files.append(Path(environ.get("DOCKER_CONFIG") or home / ".docker", "config.json"))
    return files


def credentials_for(registry: str, repository: str, environ: Mapping[str, str] = os.environ) -> tuple[str, str] | None:
    """(user, password) for a registry from the first auth file that has it. Keys may name the
    registry, or registry/namespace (podman's longest match first); Docker Hub is also found
    under docker's historical https://index.docker.io/v1/ key."""
    keys = [f"{registry}/{repository}"]
    parts = repository.split("/")
    keys += [f"{registry}/{'/'.join(parts[:i])}" for i in range(len(parts) - 1, 0, -1)]
    keys += [registry, f"https://{registry}", f"http://{registry}"]
    if registry == "docker.io":
        keys += ["https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io"]
    for path in auth_files(environ):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        auths = doc.get("auths") if isinstance(doc, dict) else None
        if not isinstance(auths, dict):
            continue
        for key in keys:
            entry = auths.get(key) or auths.get(key.rstrip("/"))
            if isinstance(entry, dict) and isinstance(entry.get("auth"), str):
                try:
                    user, _, password = base64.b64decode(entry["auth"]).decode("utf-8").partition(":")
                except (ValueError, UnicodeDecodeError):
                    continue
                return user, password
    return None


_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_CHALLENGE_PARAM.findall(rest))


@dataclass
class _Auth:
    header: str | None = None


class RegistryClient:
    """One repository of one registry."""

    def __init__(self, ref: Reference, *, insecure: bool = False, environ: Mapping[str, str] = os.environ,
                 session: Any = None):
        import requests

        self.ref = ref
        self.host = ref.api_host
        self.plain_http = insecure or is_loopback(self.host)
        self.scheme = "http" if self.plain_http else "https"
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = "microvmc"
        self.credentials = credentials_for(ref.registry, ref.repository, environ)
        self.auth = _Auth()

    def _url(self, kind: str, what: str) -> str:
        return f"{self.scheme}://{self.host}/v2/{self.ref.repository}/{kind}/{what}"

    def _get(self, url: str, *, headers: Mapping[str, str], stream: bool = False):
        import requests

        for attempt in range(2):
            sent = dict(headers)
            if self.auth.header:
                sent["Authorization"] = self.auth.header
            try:
                response = self.session.get(url, headers=sent, stream=stream, timeout=TIMEOUT)
            except requests.exceptions.SSLError as err:
                raise RegistryError(f"{self.host}: TLS failed ({_reason(err)})",
                                    hint="a registry without TLS is used only on loopback") from None
            except requests.exceptions.RequestException as err:
                raise RegistryError(f"{self.host}: cannot reach the registry ({_reason(err)})") from None
            if response.status_code == 401 and attempt == 0:
                challenge = response.headers.get("WWW-Authenticate", "")
                response.close()
                self._authenticate(challenge)
                continue
            return response
        return response

    def _authenticate(self, challenge: str) -> None:
        import requests

        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if not self.credentials:
                raise RegistryError(f"{self.ref.name}: the registry wants a user name and password, and none is in "
                                    "the auth files", hint="log in with podman login, skopeo login or docker login")
            token = base64.b64encode(":".join(self.credentials).encode()).decode()
            self.auth.header = f"Basic {token}"
            return
        if scheme != "bearer" or "realm" not in params:
            raise RegistryError(f"{self.ref.name}: the registry asks for authentication microvmc does not know "
                                f"({challenge or 'no WWW-Authenticate header'})")
        realm = params["realm"]
        from urllib.parse import urlsplit

        realm_host = urlsplit(realm).netloc
        if urlsplit(realm).scheme != "https" and not (is_loopback(realm_host) or self.plain_http):
            raise RegistryError(f"{self.ref.name}: the token service {realm} is not HTTPS")
        query = {"scope": params.get("scope") or f"repository:{self.ref.repository}:pull"}
        if "service" in params:
            query["service"] = params["service"]
        try:
            answer = self.session.get(realm, params=query, auth=self.credentials, timeout=TIMEOUT)
        except requests.exceptions.RequestException as err:
            raise RegistryError(f"{self.ref.name}: cannot reach the token service {realm} ({_reason(err)})") from None
        if answer.status_code != 200:
            who = "with the credentials of the auth file" if self.credentials else "anonymously"
            raise RegistryError(f"{self.ref.name}: the token service refused {who} (HTTP {answer.status_code})")
        try:
            doc = answer.json()
            token = doc.get("token") or doc.get("access_token")
        except ValueError:
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{self.ref.name}: the token service {realm} sent no token")
        self.auth.header = f"Bearer {token}"

    def _failed(self, response, what: str) -> RegistryError:
        detail = ""
        try:
            errors = response.json().get("errors") or []
            detail = "; ".join(str(e.get("message") or e.get("code")) for e in errors if isinstance(e, dict))
        except (ValueError, AttributeError):
            pass
        status = response.status_code
        response.close()
        if status == 404:
            return RegistryError(f"{what}: not found in {self.ref.registry}" + (f" ({detail})" if detail else ""))
        if status == 401:
            return RegistryError(f"{what}: not authorized" + (f" ({detail})" if detail else ""),
                                 hint="log in with podman login, skopeo login or docker login")
        return RegistryError(f"{what}: the registry answered HTTP {status}" + (f" ({detail})" if detail else ""))

    def manifest(self, reference: str, *, expect: str | None = None) -> tuple[bytes, str, str]:
        """(body, content type, digest) of a manifest or index, by tag or digest. A digest asked
        for (or `expect`) must be the body's."""
        what = f"{self.ref.name}:{reference}" if not reference.startswith("sha256:") else f"{self.ref.name}@{reference}"
        response = self._get(self._url("manifests", reference), headers={"Accept": MANIFEST_ACCEPT})
        if response.status_code != 200:
            raise self._failed(response, what)
        body = response.content
        digest = sha256_digest(body)
        wanted = expect or (reference if reference.startswith("sha256:") else None)
        if wanted and digest != wanted:
            raise RegistryError(f"{what}: the manifest received has digest {digest}, not {wanted}; it was not used")
        header = response.headers.get("Docker-Content-Digest")
        if header and header.startswith("sha256:") and header != digest:
            raise RegistryError(f"{what}: the manifest's digest is {digest}, but the registry says {header}; "
                                "it was not used")
        return body, response.headers.get("Content-Type", ""), digest

    def blob(self, descriptor: Descriptor, blobs: BlobStore, *, what: str,
             progress: Callable[[int], None] | None = None) -> Path:
        """The blob, from the store or downloaded into it, verified."""
        if blobs.has(descriptor.digest, descriptor.size):
            return blobs.path(descriptor.digest)

        def fetch(offset: int) -> tuple[Iterable[bytes], bool]:
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            response = self._get(self._url("blobs", descriptor.digest), headers=headers, stream=True)
            if response.status_code not in (200, 206):
                raise self._failed(response, what)
            return _chunks(response, what), response.status_code == 206

        try:
            return blobs.download(fetch, descriptor.digest, descriptor.size, what=what, progress=progress)
        except ImageError as err:
            raise RegistryError(str(err)) from None


def _chunks(response, what: str) -> Iterable[bytes]:
    import requests

    try:
        yield from response.iter_content(CHUNK)
    except requests.exceptions.RequestException as err:
        raise RegistryError(f"{what}: the download was interrupted ({_reason(err)}); pull again to resume") from None
    finally:
        response.close()


def _reason(err: Exception) -> str:
    """The innermost cause of a requests error, in a few words."""
    text = str(err)
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)|(Connection refused)|(Read timed out)", text)
    if match:
        return next(g for g in match.groups() if g)
    return text if len(text) < 160 else text[:157] + "..."
