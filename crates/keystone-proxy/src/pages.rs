//! The proxy's own answers when it cannot pass a request on: a short HTML
//! page saying what is wrong and what to do, with the matching status.
//! Every dynamic part is escaped.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};

pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A page: `title` (plain text), `body_html` (already escaped HTML).
pub fn page(status: StatusCode, title: &str, body_html: &str) -> Response<Full<Bytes>> {
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title>\
<style>body{{font-family:system-ui,sans-serif;max-width:44rem;margin:3rem auto;padding:0 1rem;color:#222}}\
code{{background:#f3f3f3;padding:.1rem .3rem;border-radius:3px}}h1{{font-size:1.4rem}}</style></head>\
<body><h1>{t}</h1>\n{body_html}\n<p><small>keystone dev-server proxy · {code}</small></p></body></html>\n",
        t = escape(title),
        code = status.as_u16(),
    );
    let mut resp = Response::new(Full::new(Bytes::from(html)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    // The page is ours, not the sandbox's: tell scripts apart.
    h.insert(
        "x-keystone-proxy",
        hyper::header::HeaderValue::from_static("error"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<a href='x'>&</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&lt;/a&gt;"
        );
    }
}
