"""`entityclip search-index` and `entityclip search`: text-to-image search over your photos.

  entityclip search-index --checkpoint C --images DIR --out INDEX.npz
  entityclip search-index --checkpoint C --records DIR --split test --out INDEX.npz
  entityclip search --checkpoint C --index INDEX.npz --query "..." -k 5 --sheet hits.png
  entityclip serve --checkpoint C --index INDEX.npz [--host 127.0.0.1 --port 8000]
"""
import numpy as np

from entityclip_jax import storage
from entityclip_jax.checkpoints.towers import load_towers, load_towers_and_heads
from entityclip_jax.data.pipeline import make_dataset, numpy_batches, split_size
from entityclip_jax.data.tokenizer import ensure_openai_vocab, load_tokenizer
from entityclip_jax.errors import EntityClipError
from entityclip_jax.eval.encode import clip_encoders, collecting, encode_dataset
from entityclip_jax.eval.search import (build_index, contact_sheet, find_images, image_folder_batches, load_index,
                                        model_fingerprint, query_index)
from entityclip_jax.eval.serve import (SearchPages, is_loopback, make_server, records_attention, serve_until_stopped,
                                       thumbnail_source)
from entityclip_jax.hub import resolve_checkpoint
from entityclip_jax.models.clip import CLIPModel


def configure_search_index(parser):
    parser.add_argument("--checkpoint", required=True,
                        help="towers directory, training workdir, Hugging Face CLIPModel directory or OpenAI .pt")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="a folder of images (searched recursively)")
    source.add_argument("--records", help="a TFRecord dataset directory written by write-records")
    parser.add_argument("--split", default="test", help="split of --records to index (default: test)")
    parser.add_argument("--out", required=True, help="index file to write (.npz)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoding step (default: 64)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                        help="storage precision of the embeddings (default: float16, half the size)")


def run_search_index(args):
    storage.check_writable(storage.parent(args.out), "choose an --out you can write to, or fix its permissions")
    model, params, config = _load(args.checkpoint)
    if args.batch_size < 1:
        raise EntityClipError(f"--batch-size must be at least 1, got {args.batch_size}")
    encode_image, encode_text = _encoders(model, params)
    image_size = config.vision.image_size
    if args.images:
        paths = find_images(args.images)
        batches = image_folder_batches(paths, image_size, args.batch_size)
        source = {"kind": "folder", "directory": storage.resolve(args.images)}
        total = len(paths)
    else:   # records bring captions too: embedded and stored, so an image can show its nearest ones
        dataset = make_dataset(args.records, args.split, batch_size=args.batch_size, image_size=image_size,
                               train=False, process_index=0, process_count=1)
        captions = []
        batches = collecting(numpy_batches(dataset, (args.records, args.split)), "query", captions)
        source = {"kind": "records", "directory": storage.absolute(args.records), "split": args.split,
                  "image_size": image_size}
        total = split_size(args.records, args.split)
    embeds, text_embeds, ids, _ = encode_dataset(batches, encode_image, encode_text if args.records else None)
    out = build_index(args.out, embeds, ids, ids=ids, fingerprint=model_fingerprint(params),
                      source=source, dtype=args.dtype,
                      captions=(np.concatenate(captions), ids, text_embeds) if args.records else None)
    skipped = total - len(ids)
    print(f"indexed {len(ids)} images from {source['directory']} -> {out}"
          + (f" ({skipped} files could not be decoded and were skipped)" if skipped else ""))
    return 0


def configure_search(parser):
    parser.add_argument("--checkpoint", required=True, help="the checkpoint the index was built with")
    parser.add_argument("--index", required=True, help="index file written by search-index")
    parser.add_argument("--query", action="append", required=True,
                        help="text to search for (repeat --query for several)")
    parser.add_argument("-k", type=int, default=5, help="images per query (default: 5)")
    parser.add_argument("--sheet", help="contact-sheet PNG of the hits (several queries: NAME_1.png, NAME_2.png, ...)")
    parser.add_argument("--tokenizer", help="tokenizer directory or bpe_simple_vocab_16e6.txt.gz "
                                            "(default: the checkpoint's own, else OpenAI's vocabulary)")


def run_search(args):
    empty = [number for number, query in enumerate(args.query, start=1) if not query.strip()]
    if empty:  # an empty text still encodes: its "hits" would look like an answer
        raise EntityClipError(f"--query number {empty[0]} is empty; pass the words to search for, "
                              "e.g. --query \"Queen Elizabeth II waves outside Buckingham Palace\"")
    index = load_index(args.index)
    model, params, config = _load(args.checkpoint)
    tokenizer = _tokenizer(args.tokenizer, args.checkpoint)
    ids, _, _ = tokenizer.encode_with_mask(args.query, config.text.max_position_embeddings)
    _, encode_text = _encoders(model, params)
    paths, scores = query_index(index, encode_text(ids), args.k, fingerprint=model_fingerprint(params))
    for number, (query, hits, hit_scores) in enumerate(zip(args.query, paths, scores), start=1):
        print(f"query: {query}")
        for rank, (path, score) in enumerate(zip(hits, hit_scores), start=1):
            print(f"  {rank:2d}. {score:.4f}  {path}")
        if args.sheet:
            sheet = _sheet_path(args.sheet, number, len(args.query))
            images, captions = _hit_images(index, hits)
            contact_sheet(images, hit_scores, query, sheet, captions=captions)
            print(f"  contact sheet: {sheet}")
    return 0


def configure_serve(parser):
    parser.add_argument("--index", required=True, help="index file written by search-index")
    parser.add_argument("--checkpoint", required=True, help="the checkpoint the index was built with")
    parser.add_argument("--tokenizer", help="tokenizer directory or bpe_simple_vocab_16e6.txt.gz "
                                            "(default: the checkpoint's own, else OpenAI's vocabulary)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    parser.add_argument("--allow-remote", action="store_true",
                        help="let --host be an address other machines reach (the page has no login)")


def run_serve(args):
    if not is_loopback(args.host) and not args.allow_remote:
        raise EntityClipError(f"--host {args.host} would let other machines query the model and see the images, "
                              "with no login; add --allow-remote if that is what you want")
    index = load_index(args.index)
    config, params, heads = load_towers_and_heads(args.checkpoint)
    fingerprint = model_fingerprint(params)
    if index.fingerprint and fingerprint != index.fingerprint:
        raise EntityClipError(f"the index was built by model {index.fingerprint}, --checkpoint is model "
                              f"{fingerprint}; serve it with the checkpoint it was built with, or rebuild it "
                              "(`entityclip search-index`)")
    tokenizer = _tokenizer(args.tokenizer, args.checkpoint)
    _, encode_text = _encoders(CLIPModel(config), params)

    def encode_query(texts):
        ids, _ = tokenizer.encode(texts, config.text.max_position_embeddings)
        return encode_text(ids)

    print(f"loading thumbnails of {len(index.ids)} images ...", flush=True)
    pages = SearchPages(index, encode_query, thumbnail_source(index),
                        records_attention(index, config, params, heads, tokenizer),
                        title=f"search {storage.path(args.index).name}")
    try:
        server = make_server(pages, args.host, args.port)
    except OSError as err:
        raise EntityClipError(f"cannot listen on {args.host}:{args.port} ({err.strerror}); choose another --port")
    if not is_loopback(args.host):
        print(f"WARNING: listening on {args.host}: anyone who reaches this machine can query the model "
              "and see the indexed images", flush=True)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {args.index} on http://{host}:{server.server_port}/ (Ctrl-C or SIGTERM stops)", flush=True)
    serve_until_stopped(server)
    print("stopped", flush=True)
    return 0


def _load(checkpoint):
    config, params = load_towers(checkpoint)
    return CLIPModel(config), params, config


def _encoders(model, params):
    return clip_encoders(model, params)


def _tokenizer(tokenizer_path, checkpoint):
    if tokenizer_path:
        return load_tokenizer(tokenizer_path)
    checkpoint = storage.path(resolve_checkpoint(checkpoint))  # a hub model's or a gs:// export's own files
    if (checkpoint / "tokenizer.json").is_file() or (checkpoint / "vocab.json").is_file():
        return load_tokenizer(str(checkpoint))
    return load_tokenizer(ensure_openai_vocab())


def _sheet_path(sheet, number, count):
    sheet = storage.path(sheet)
    return str(sheet) if count == 1 else str(sheet.with_name(f"{sheet.stem}_{number}{sheet.suffix or '.png'}"))


def _hit_images(index, hits):
    """What to draw for each hit: the file, or for records the preprocessed image found by id."""
    if index.source.get("kind") != "records":
        return list(hits), None
    found = {}
    dataset = make_dataset(index.source["directory"], index.source["split"], batch_size=64,
                           image_size=index.source.get("image_size", 224), train=False, process_index=0,
                           process_count=1, normalize_on_host=False, ids=list(hits))   # decodes just the hits
    for batch in numpy_batches(dataset, (index.source["directory"], index.source["split"])):
        for example_id, pixels in zip(batch["id"], batch["pixel_values"]):
            found[example_id.decode("utf-8")] = pixels
    return [found.get(h, f"{h} (not found in the records)") for h in hits], [str(h) for h in hits]
