#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (fuzz/corpus/<target>/) from a real small
JPEG and PNG in the test data: corrupt, truncated and bomb images, raw buffers of the wrong
length, huge declared sizes, non-UTF-8 and control characters, 1 MiB fields and deeply
nested MessagePack and RESP. Standard library only.

    seeds.py REPO_ROOT
"""
import os
import struct
import sys
import zlib

MIB = 1 << 20


def png_chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(width, height, colour_type, rows_zlib):
    """A PNG with the given header and compressed image data (CRCs correct)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", rows_zlib)
            + png_chunk(b"IEND", b""))


def grey_png(width, height, value=0):
    rows = b"".join(b"\x00" + bytes([value]) * width for _ in range(height))
    return png(width, height, 0, zlib.compress(rows, 9))


def jpeg_sized(jpeg, width, height):
    """The same JPEG with its frame header (SOFn) declaring another size."""
    out = bytearray(jpeg)
    i = 2
    while i + 9 < len(out):
        if out[i] != 0xFF:
            break
        marker = out[i + 1]
        seg = struct.unpack(">H", out[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            out[i + 5:i + 9] = struct.pack(">HH", height, width)
            return bytes(out)
        i += 2 + seg
    return bytes(out)


def mp_str(s):
    b = s.encode()
    return bytes([0xA0 | len(b)]) + b


def mp_bin(b):
    if len(b) < 256:
        return b"\xc4" + bytes([len(b)]) + b
    return b"\xc6" + struct.pack(">I", len(b)) + b


def mp_uint(n):
    return b"\xce" + struct.pack(">I", n)


def envelope(fields):
    """A MessagePack map of `fields` (name -> already-encoded value)."""
    return bytes([0x80 | len(fields)]) + b"".join(mp_str(k) + v for k, v in fields.items())


def resp(v):
    """RESP2 encoding of nested lists, bytes, str, int and None."""
    if v is None:
        return b"$-1\r\n"
    if isinstance(v, int):
        return b":%d\r\n" % v
    if isinstance(v, str):
        v = v.encode()
    if isinstance(v, bytes):
        return b"$%d\r\n%s\r\n" % (len(v), v)
    return b"*%d\r\n" % len(v) + b"".join(resp(x) for x in v)


def plain(flags, fmt, width, height, max_choice, ts, data):
    """The frame_plain target's input: its 12-byte header, then the `data` field."""
    return bytes([flags, fmt]) + struct.pack("<II", width, height) + bytes([max_choice, ts]) + data


def main():
    root = sys.argv[1]
    corpus = os.path.join(root, "fuzz", "corpus")
    jpeg = open(os.path.join(root, "tests/parity/jpeg/scene-420-97x61.jpg"), "rb").read()
    pngf = open(os.path.join(root, "tests/parity/jpeg/scene-420-97x61.pil.png"), "rb").read()
    progressive = open(os.path.join(root, "tests/parity/jpeg/scene-420-progressive-160x120.jpg"),
                       "rb").read()

    images = {
        "jpeg": jpeg,
        "jpeg-progressive": progressive,
        "png": pngf,
        "jpeg-truncated-third": jpeg[: len(jpeg) // 3],
        "jpeg-truncated-last-byte": jpeg[:-1],
        "jpeg-header-only": jpeg[:4],
        "jpeg-corrupt-middle": jpeg[: len(jpeg) // 2] + bytes(64) + jpeg[len(jpeg) // 2 + 64:],
        "jpeg-declares-65535x65535": jpeg_sized(jpeg, 65535, 65535),
        "jpeg-declares-0x0": jpeg_sized(jpeg, 0, 0),
        "png-truncated-half": pngf[: len(pngf) // 2],
        "png-corrupt-idat": pngf[:60] + bytes(b ^ 0x55 for b in pngf[60:200]) + pngf[200:],
        "png-declares-65535x65535": png(65535, 65535, 2, zlib.compress(b"\x00" * 1000)),
        # Within the default MAX_FRAME_PIXELS: 36 Mpixels from a 35 kB file.
        "png-bomb-6000x6000": grey_png(6000, 6000),
        # Over it: refused by the header before any inflation.
        "png-bomb-20000x20000": grey_png(20000, 20000),
        "png-bad-colour-type": png(4, 4, 7, zlib.compress(b"\x00" * 20)),
        "gif": b"GIF89a\x01\x00\x01\x00\x00\x00\x00;",
    }

    rgb_2x2 = bytes(range(12))
    nested_array = b"\x91" * 100_000 + b"\xc0"
    nested_map = b"\x81\xa1x" * 50_000 + b"\xc0"
    targets = {
        "frame_image": images,
        "frame_plain": {
            **{f"jpeg-{k}": plain(0x11, 0, 0, 0, 0, 0, v) for k, v in images.items()},
            "rgb24-2x2": plain(0x1F, 2, 2, 2, 0, 2, rgb_2x2),
            "rgb24-wrong-length": plain(0x17 | 0x10, 2, 2, 2, 0, 0, rgb_2x2[:11]),
            "gray8-2x2": plain(0x17, 3, 2, 2, 0, 0, bytes(4)),
            "gray8-no-height": plain(0x13, 3, 2, 0, 0, 0, bytes(4)),
            "rgb24-65535x65535-short": plain(0x17, 2, 65535, 65535, 0, 0, rgb_2x2),
            "rgb24-max-u32-no-limit": plain(0x17, 2, 0xFFFFFFFF, 0xFFFFFFFF, 3, 0, rgb_2x2),
            "gray8-max-u32-no-limit": plain(0x17, 3, 0xFFFFFFFF, 0xFFFFFFFF, 3, 0, rgb_2x2),
            "rgb24-zero-width": plain(0x17, 2, 0, 2, 3, 0, b""),
            "unknown-format": plain(0x11, 5, 0, 0, 0, 0, rgb_2x2),
            "data-not-bytes": plain(0x31, 0, 0, 0, 0, 0, jpeg[:100]),
            "ts-not-utf8": plain(0x1F, 2, 2, 2, 0, 1, rgb_2x2),
            "no-data": plain(0x07, 2, 2, 2, 0, 0, b""),
            "rgb24-1mib-wrong": plain(0x17, 2, 512, 683, 0, 0, bytes(MIB)),
        },
        "frame_msgpack": {
            "rgb24-2x2": envelope({"ts": mp_uint(5), "width": mp_uint(2), "height": mp_uint(2),
                                   "format": mp_str("rgb24"), "data": mp_bin(rgb_2x2)}),
            "jpeg": envelope({"ts": mp_uint(1), "data": mp_bin(jpeg)}),
            "png": envelope({"format": mp_str("png"), "data": mp_bin(pngf)}),
            "png-bomb": envelope({"data": mp_bin(images["png-bomb-6000x6000"])}),
            "rgb24-wrong-length": envelope({"width": mp_uint(2), "height": mp_uint(2),
                                            "format": mp_str("rgb24"), "data": mp_bin(bytes(11))}),
            "rgb24-huge-declared": envelope({"width": mp_uint(0xFFFFFFFF),
                                             "height": mp_uint(0xFFFFFFFF),
                                             "format": mp_str("rgb24"), "data": mp_bin(b"x")}),
            "data-1mib": envelope({"width": mp_uint(1024), "height": mp_uint(1024),
                                   "format": mp_str("gray8"), "data": mp_bin(bytes(MIB))}),
            "truncated": envelope({"ts": mp_uint(1), "data": mp_bin(jpeg)})[:40],
            "nested-array-100000": nested_array,
            "nested-in-unknown-field": b"\x82\xa1x" + nested_array + b"\xa4data\xc4\x00",
            "nested-maps-50000": nested_map,
            "not-a-map": b"\x93\x01\x02\x03",
            "format-not-utf8": b"\x82\xa6format\xa2\xff\xfe\xa4data\xc4\x00",
        },
        "ppm_reader": {
            "two-frames": (b"P6\n2 2\n255\n" + rgb_2x2) * 2,
            "ends-inside-frame": b"P6\n2 2\n255\n" + rgb_2x2[:5],
            "ends-inside-header": b"P6\n2 2",
            "zero-width": b"P6\n0 2\n255\n",
            "u32-max": b"P6\n4294967295 4294967295\n255\n",
            "over-u32": b"P6\n99999999999 1\n255\n",
            "8192x8193": b"P6\n8192 8193\n255\n",
            "16-bit": b"P6\n1 1\n65535\n" + bytes(6),
            "not-p6": b"P5\n1 1\n255\n\x00",
            "no-separator": b"P6\n1x1\n255\n\x00\x00\x00",
            "control-chars": b"P6\x0b\x0c1\t1\r255\n\x00\x00\x00",
        },
        "prompt_phrases": {
            "list": b"\x00Detect: person, red car and dog; a cat | bicycle.",
            "names-nothing": b"\x00Detect:",
            "instruction-only": b"\x00Find and detect the, or and &",
            "non-utf8": b"\x00person\xff\xfecar, \xc3\x28dog",
            "controls": b"\x00per\x00son,\x1bcar\x7f,\tdog\x0b\x0c",
            "unicode-lowercase": "\x00İSTANBUL, ΣΊΣΥΦΟΣ, ǅ, ß, \u2028x\u2029y".encode(),
            "1mib-many": b"\xffa b, c; ",
            "1mib-one": b"\xffxyz ",
        },
        "stream_ref": {
            "hls": b"\x00https://cam.example/live/index.m3u8?token=a#x",
            "rtsp": b"\x00rtsp://user:pw@10.0.0.1:554/stream",
            "file": b"\x00file:///etc/passwd",
            "path": b"\x00/var/video.mp4",
            "option": b"\x00-i",
            "space-option": b"\x00 -f lavfi",
            "concat": b"\x00concat:a.ts|b.ts",
            "subfile": b"\x00subfile,,start,0,end,10,,:/etc/passwd",
            "drive": b"\x00C:\\video.mp4",
            "control": b"\x00http://h/\x00a\r\nb",
            "non-utf8": b"\x00http://h/\xff",
            "redis-key": b"\x00redis://frames:cam1",
            "redis-option": b"\x00redis://-x",
            "redis-own-key": b"\x00redis://{fr}:jobs",
            "redis-empty": b"\x00REDIS://   ",
            "1mib": b"\xffhttp://h/",
        },
        "redis_reply": {
            "run": b"\x00" + resp(["run", "1"]),
            "final": b"\x00" + resp(["dead", "dead", "too many attempts", "5"]),
            "final-not-terminal": b"\x00" + resp(["finished", "running", "", "x"]),
            "ok": b"\x00+ok\r\n",
            "lost-bulk": b"\x00" + resp("lost"),
            "leases": b"\x03" + resp(["ok", "lost", "cancel"]),
            "cancel": b"\x00" + resp("already completed"),
            "end": b"\x00" + resp(["completed", 12]),
            "end-negative": b"\x00" + resp(["completed", -1]),
            "xreadgroup": b"\x00" + resp([["{fr}:jobs", [["1-0", ["stream_ref", "x", "fps", "2"]],
                                                         ["2-0", None],
                                                         ["3-0", ["job_id", b"\xff", "odd"]]]]]),
            "xclaim": b"\x00" + resp([["1-0", ["stream_ref", "redis://f"]], ["2-0", None]]),
            "resp3-map": b"\x00%1\r\n$4\r\njobs\r\n*1\r\n*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\na\r\n$1\r\nb\r\n",
            "nested-100000": b"\x00" + b"*1\r\n" * 100_000 + b":1\r\n",
            "bulk-1mib": b"\x00" + resp(["run", "x" * MIB]),
            "truncated": b"\x00*3\r\n$3\r\nrun\r\n$5\r\n1",
            "negative-length": b"\x00*-5\r\n$-7\r\n",
            "error": b"\x00-NOJOB no such job\r\n",
        },
        # Arbitrary-structured input: the fuzzer builds its own; a few bytes to start from.
        "job_entry": {
            "empty": b"",
            "bytes": bytes(range(256)),
        },
    }
    for target, seeds in targets.items():
        d = os.path.join(corpus, target)
        os.makedirs(d, exist_ok=True)
        for name, data in seeds.items():
            with open(os.path.join(d, "seed-" + name), "wb") as f:
                f.write(data)
    print(f"seeds: {sum(len(s) for s in targets.values())} files in {corpus}")


if __name__ == "__main__":
    main()
