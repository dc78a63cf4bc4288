"""`entityclip serve`'s web pages: search an index by typing a query, in a browser.

  /                      a query box; ?q=TEXT&k=N: the top N images, best first
  /image?id=ID[&q=TEXT]  one image, large: its nearest captions (an index built from
                         records holds them) and, given the query and an EntityCLIP run,
                         the explanation words each explanation expert attends to
  /thumbnail?id=ID       the image, small (JPEG)
The standard library's ThreadingHTTPServer (a thread per request) and the report
templates (Jinja2, autoescaped: a query is user text, shown as text). Bad input
gets a page that says what is wrong (400, or 404 for an unknown image), never a
traceback; the model runs under one lock, one query at a time.
"""
import functools
import http.server
import ipaddress
import signal
import socket
import sys
import threading
import traceback
import urllib.parse

import numpy as np

from entityclip_jax.data.pipeline import make_dataset, numpy_batches
from entityclip_jax.errors import EntityClipError
from entityclip_jax.eval.attention import expert_words
from entityclip_jax.eval.html_report import templates
from entityclip_jax.eval.search import nearest_captions, query_rows
from entityclip_jax.eval.thumbnails import jpeg_thumbnail, record_thumbnails

MAX_QUERY_CHARS = 1000      # a query past this is refused; the tokenizer would keep only its first tokens anyway
DEFAULT_K, MAX_K = 10, 100
CAPTIONS_K = 10


class PageError(Exception):
    """Bad input from the browser: shown on the page with this status."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


class SearchPages:
    """What each URL answers: handle(path, params) -> (status, content type, body bytes).

    index: a SearchIndex; encode_query(list of str) -> [Q, D] text embeddings of the
    index's model; thumbnail(image id) -> JPEG bytes (KeyError when there is none);
    attention(query, image id) -> expert_words' output, or None when the model has no
    explanation experts (not an EntityCLIP run) or the index is not of records.
    """

    def __init__(self, index, encode_query, thumbnail, attention=None, title="entityclip search"):
        self.index, self.encode_query, self.thumbnail, self.attention = index, encode_query, thumbnail, attention
        self.title = title
        self.rows = {str(i): row for row, i in enumerate(index.ids)}
        self.model_lock = threading.Lock()
        self.templates = templates()

    def handle(self, path, params):
        routes = {"/": self.search_page, "/image": self.image_page, "/thumbnail": self.thumbnail_image}
        if path not in routes:
            return self._page("message.html", 404, message=f"no page {path} here; start from the search page")
        try:
            return routes[path](params)
        except (PageError, EntityClipError) as err:
            if path == "/thumbnail":
                return getattr(err, "status", 400), "text/plain; charset=utf-8", str(err).encode()
            return self._page("message.html", getattr(err, "status", 400), message=str(err),
                              query=params.get("q", ""))

    def search_page(self, params):
        if "q" not in params:
            return self._page("search.html", 200, query="", k=DEFAULT_K, hits=None, attention=False)
        query, k = checked_query(params.get("q", "")), checked_k(params.get("k", ""))
        with self.model_lock:
            embeds = np.asarray(self.encode_query([query]))
        rows, scores = query_rows(self.index, embeds, k)
        hits = [{"id": str(self.index.ids[r]), "path": str(self.index.paths[r]), "score": float(s)}
                for r, s in zip(rows[0], scores[0])]
        return self._page("search.html", 200, query=query, k=k, hits=hits, attention=self.attention is not None)

    def image_page(self, params):
        image_id = params.get("id", "")
        row = self._row(image_id)
        query = params.get("q", "").strip()
        captions = note = experts = None
        if self.index.texts is None:
            note = "this index holds no captions (it was built from a folder of images, or by an older version)"
        else:
            rows, scores = nearest_captions(self.index, row, CAPTIONS_K)
            captions = [{"text": str(self.index.texts[t]), "id": str(self.index.text_ids[t]), "score": float(s),
                         "own": str(self.index.text_ids[t]) == image_id} for t, s in zip(rows, scores)]
        if query and self.attention is not None:
            query = checked_query(query)
            with self.model_lock:
                experts = self.attention(query, image_id)
        return self._page("image.html", 200, image_id=image_id, path=str(self.index.paths[row]), query=query,
                          captions=captions, note=note, experts=experts, attention=self.attention is not None)

    def thumbnail_image(self, params):
        image_id = params.get("id", "")
        self._row(image_id)
        try:
            return 200, "image/jpeg", self.thumbnail(image_id)
        except KeyError:
            raise PageError(f"no picture of image {image_id!r}", 404) from None

    def _row(self, image_id):
        if image_id not in self.rows:
            raise PageError(f"no image with id {image_id!r} in this index", 404)
        return self.rows[image_id]

    def _page(self, template, status, **context):
        html = self.templates.get_template(template).render(title=self.title, **context)
        return status, "text/html; charset=utf-8", html.encode("utf-8")


def checked_query(text):
    query = str(text).strip()
    if not query:
        raise PageError("type a query: the text to find images for")
    if len(query) > MAX_QUERY_CHARS:
        raise PageError(f"the query is {len(query)} characters long; at most {MAX_QUERY_CHARS}")
    return query


def checked_k(text):
    if str(text).strip() == "":
        return DEFAULT_K
    try:
        k = int(text)
    except ValueError:
        raise PageError(f"the number of images must be a whole number from 1 to {MAX_K}, got {text!r}") from None
    if not 1 <= k <= MAX_K:
        raise PageError(f"the number of images must be from 1 to {MAX_K}, got {k}")
    return k


def make_server(pages, host="127.0.0.1", port=0):
    """A ThreadingHTTPServer answering with pages.handle; port 0 picks a free port (server.server_port)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
            params = {key: values[-1] for key, values in query.items()}
            try:
                status, content_type, body = pages.handle(url.path, params)
            except Exception:   # a bug, not bad input: the page says so, the server goes on
                traceback.print_exc()
                status, content_type, body = 500, "text/plain; charset=utf-8", b"internal error; see the server log"
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):   # one line per request, on stderr
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    class Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        daemon_threads = True   # a slow client does not hold up the stop

    return Server((host, port), Handler)


def is_loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve_until_stopped(server):
    """serve_forever until SIGTERM or Ctrl-C; then the socket is closed. Returns once stopped."""
    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()   # shutdown() waits for serve_forever
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()


def thumbnail_source(index, size=None):
    """thumbnail(image id) -> JPEG bytes for the index's images: a records index's are made once, now;
    a folder's are read from their files when first asked for (and kept)."""
    if index.source.get("kind") == "records":
        found = record_thumbnails(index.source["directory"], index.source["split"],
                                  index.source.get("image_size", 224))
        return found.__getitem__
    paths = {str(i): str(p) for i, p in zip(index.ids, index.paths)}
    return functools.lru_cache(maxsize=4096)(lambda image_id: jpeg_thumbnail(paths[image_id]))


def records_attention(index, clip_config, tower_params, heads, tokenizer):
    """attention(query, image id) for SearchPages, or None without explanation experts or records:
    the image and its explanation are read from the records by id."""
    if heads is None or "explanation_experts" not in heads or index.source.get("kind") != "records":
        return None

    def attention(query, image_id):
        dataset = make_dataset(index.source["directory"], index.source["split"], batch_size=1,
                               image_size=clip_config.vision.image_size, train=False, process_index=0,
                               process_count=1, ids=[image_id])
        batch = next(numpy_batches(dataset, (index.source["directory"], index.source["split"])), None)
        if batch is None:
            raise PageError(f"image {image_id!r} is no longer in {index.source['directory']}", 404)
        query_ids, _ = tokenizer.encode([query], clip_config.text.max_position_embeddings)
        return expert_words(clip_config, tower_params, heads, batch["pixel_values"], query_ids,
                            batch["explanation_ids"], tokenizer)
    return attention
