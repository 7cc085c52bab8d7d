"""A misbehaving HLS server for the stream faults: one set of ffmpeg-made segments served
under a path per fault (`/<mode>/live.m3u8`): `stall` (the playlist grows, a segment's body
stops after its first bytes and never ends), `e500` (every request answers 500), `trunc`
(segments declare their full length and stop at a fifth of it), `frozen` (a live playlist
that never grows and never ends), `good` (a live playlist that grows)."""

import http.server
import os
import socketserver
import subprocess
import threading
import time

SEGMENTS = 10
SEG_S = 1


def make_segments(directory):
    os.makedirs(directory, exist_ok=True)
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
         "-i", "testsrc2=size=160x120:rate=10", "-t", str(SEGMENTS * SEG_S),
         "-c:v", "libx264", "-preset", "ultrafast", "-g", "10", "-f", "hls",
         "-hls_time", str(SEG_S), "-hls_list_size", "0", "-hls_playlist_type", "vod",
         "-hls_segment_filename", os.path.join(directory, "seg%d.ts"),
         os.path.join(directory, "vod.m3u8")],
        check=True)
    return [open(os.path.join(directory, "seg%d.ts" % i), "rb").read() for i in range(SEGMENTS)]


class BadHls:
    def __init__(self, directory, port):
        self.segments = make_segments(directory)
        self.t0 = time.time()
        self.stopping = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                parts = self.path.strip("/").split("/")
                if len(parts) != 2:
                    return self.send_error(404)
                outer.serve(self, parts[0], parts[1])

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", port), Handler)
        self.port = port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, mode):
        return "http://127.0.0.1:%d/%s/live.m3u8" % (self.port, mode)

    def playlist(self, first, count):
        lines = ["#EXTM3U", "#EXT-X-VERSION:3", "#EXT-X-TARGETDURATION:%d" % SEG_S,
                 "#EXT-X-MEDIA-SEQUENCE:%d" % first]
        for i in range(first, first + count):
            if i % SEGMENTS == 0 and i > 0:
                lines.append("#EXT-X-DISCONTINUITY")
            lines += ["#EXTINF:%.3f," % SEG_S, "s%d.ts" % i]
        return ("\n".join(lines) + "\n").encode()

    def serve(self, h, mode, name):
        if mode == "e500":
            return h.send_error(500)
        if name == "live.m3u8":
            if mode == "frozen":
                body = self.playlist(0, 3)
            else:
                body = self.playlist(int((time.time() - self.t0) / SEG_S), 3)
            h.send_response(200)
            h.send_header("Content-Type", "application/vnd.apple.mpegurl")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        if not (name.startswith("s") and name.endswith(".ts")):
            return h.send_error(404)
        seg = self.segments[int(name[1:-3]) % SEGMENTS]
        h.send_response(200)
        h.send_header("Content-Type", "video/mp2t")
        h.send_header("Content-Length", str(len(seg)))
        h.end_headers()
        if mode == "stall":
            h.wfile.write(seg[:1024])
            h.wfile.flush()
            self.stopping.wait()
            return
        if mode == "trunc":
            h.wfile.write(seg[: len(seg) // 5])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(seg)

    def stop(self):
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
