// The browser side of `keystone agent attach --web`: an xterm.js terminal
// bridged to the session over one WebSocket. Terminal output arrives as
// binary frames (raw bytes, so UTF-8 split across frames survives); keys go
// back as binary frames; a resize is a text frame {"cols":N,"rows":M}.
(function () {
  "use strict";
  const term = new Terminal({
    cursorBlink: true,
    fontFamily: "'DejaVu Sans Mono', 'Liberation Mono', monospace",
    fontSize: 14,
    scrollback: 5000,
  });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(document.getElementById("terminal"));
  fit.fit();
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(
    `${scheme}//${location.host}/ws?cols=${term.cols}&rows=${term.rows}`
  );
  ws.binaryType = "arraybuffer";
  const encoder = new TextEncoder();
  ws.onmessage = (e) => {
    if (typeof e.data === "string") {
      term.write(e.data);
    } else {
      term.write(new Uint8Array(e.data));
    }
  };
  ws.onopen = () => {
    document.title = document.title.replace(/^\[closed\] /, "");
    term.focus();
  };
  ws.onclose = () => {
    term.write("\r\n\x1b[2m[keystone: the connection to the session closed; reload to attach again]\x1b[0m\r\n");
    document.title = "[closed] " + document.title;
  };
  term.onData((data) => {
    if (ws.readyState === WebSocket.OPEN) ws.send(encoder.encode(data));
  });
  term.onBinary((data) => {
    if (ws.readyState !== WebSocket.OPEN) return;
    const bytes = new Uint8Array(data.length);
    for (let i = 0; i < data.length; i++) bytes[i] = data.charCodeAt(i) & 0xff;
    ws.send(bytes);
  });
  term.onResize(({ cols, rows }) => {
    if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ cols, rows }));
  });
  window.addEventListener("resize", () => fit.fit());
})();
