"""Images an OpenAI request names by URL: data URLs go to the model as they are, http(s) URLs are fetched here
from the hosts the operator allowed, and nothing else is read.

The model takes images inline only (it never fetches a URL, never reads a local file). The front end fetches an
`http(s)` image only when the server was started with `--allowed-media-domains` (vLLM's name) listing its host
exactly, with a timeout and the deployment's byte cap (the body is read in pieces and dropped past it), follows
at most a few redirects and only to hosts on the list, and sends the bytes on inline as a data URL. `file:` and
every other scheme are refused. `MAX_BODY_BYTES` (the front end's request body cap) is here because what a
request may carry is mostly images: the default admits one image at the default 10 MiB cap as base64 (4/3 of
it) with room to spare, or several ordinary photographs.

This module is light (httpx is imported when a URL is fetched), so the command line can read its defaults.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

MAX_BODY_BYTES = 20 * 1024 * 1024
MAX_REDIRECTS = 3
REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class MediaOptions:
    allowed_domains: tuple[str, ...] = ()  # hosts whose http(s) images may be fetched (exact, lower case)
    timeout_s: float = 10.0  # the whole fetch, redirects included


class MediaError(Exception):
    """An image URL that cannot be used; `param` names the content part."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message, self.param = message, param


def check_url(url: str, param: str, options: MediaOptions) -> str:
    """'data' or 'http' (to fetch) for a usable URL; MediaError naming the part for any other."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return "data"
    if scheme in ("http", "https"):
        host = (urlsplit(url).hostname or "").lower()
        if not options.allowed_domains:
            raise MediaError(f"{param}: this server fetches no image URL (it was started without "
                             "--allowed-media-domains): send the image inline as a data URL (data:image/png;base64,...)",
                             param)
        if host not in options.allowed_domains:
            raise MediaError(f"{param}: the host {host!r} is not one this server may fetch images from "
                             f"(--allowed-media-domains: {', '.join(options.allowed_domains)}): send the image inline as "
                             "a data URL", param)
        return "http"
    shown = f"{scheme}:" if scheme else repr(url[:40])
    raise MediaError(f"{param}: an image URL must be a data URL (data:image/png;base64,...) or an http(s) URL, got "
                     f"{shown}" + (": the server never reads local files" if scheme == "file" else ""), param)


async def fetch(url: str, param: str, options: MediaOptions, max_bytes: int, client: Any = None) -> str:
    """The image at an allowed http(s) URL, as a data URL; MediaError naming the part if it cannot be fetched, is
    over `max_bytes`, takes longer than the timeout or redirects to a host off the list."""
    import asyncio

    import httpx

    own = client is None
    client = client or httpx.AsyncClient(follow_redirects=False, trust_env=False)
    try:
        async with asyncio.timeout(options.timeout_s):
            for _ in range(MAX_REDIRECTS + 1):
                check_url(url, param, options)
                async with client.stream("GET", url, headers={"Accept": "image/*"}) as response:
                    if response.status_code in REDIRECTS and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise MediaError(f"{param}: fetching {_short(url)} answered HTTP {response.status_code}", param)
                    length = response.headers.get("content-length")
                    if length is not None and length.isdigit() and int(length) > max_bytes:
                        raise _too_large(param, int(length), max_bytes)
                    data = bytearray()
                    async for piece in response.aiter_bytes():
                        data += piece
                        if len(data) > max_bytes:
                            raise _too_large(param, len(data), max_bytes)
                    media = response.headers.get("content-type", "").split(";")[0].strip().lower()
                    media = media if media.startswith("image/") else "image/*"
                    return f"data:{media};base64,{base64.b64encode(bytes(data)).decode('ascii')}"
            raise MediaError(f"{param}: {_short(url)} redirected more than {MAX_REDIRECTS} times", param)
    except TimeoutError:
        raise MediaError(f"{param}: fetching the image took longer than {options.timeout_s:g} s (the server's "
                         "--media-fetch-timeout)", param) from None
    except httpx.HTTPError as e:
        raise MediaError(f"{param}: could not fetch {_short(url)} ({type(e).__name__}: {e})", param) from None
    finally:
        if own:
            await client.aclose()


def _too_large(param: str, size: int, cap: int) -> MediaError:
    return MediaError(f"{param}: the image is {size} bytes or more, over this deployment's limit of {cap} bytes", param)


def _short(url: str, limit: int = 80) -> str:
    return url if len(url) <= limit else url[: limit - 3] + "..."


async def inline(parts: list[tuple[str, Any]], options: MediaOptions, max_bytes: int) -> None:
    """Every (param, image part) of a request with a data URL: allowed http(s) URLs are fetched (together) and
    replaced by the data URL of their image; any other URL is refused (MediaError naming the first bad part)."""
    import asyncio

    fetches = [(param, part) for param, part in parts if check_url(part.image_url.url, param, options) == "http"]
    if not fetches:
        return
    import httpx

    async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
        results = await asyncio.gather(*(fetch(part.image_url.url, param, options, max_bytes, client)
                                         for param, part in fetches), return_exceptions=True)
    for (_, part), result in zip(fetches, results):
        if isinstance(result, BaseException):
            raise result
        part.image_url.url = result
