//! `#[privileged_test]`, re-exported as `lb_lab::privileged_test`: the one
//! way to declare a test that needs root (BPF, network namespaces). It
//! makes the function a `#[test]` whose body first passes the privilege
//! gate (`lb_lab::privilege::require_root`): as root the test runs; without
//! root it fails under CI=true and otherwise prints `SKIPPED <test>: ...`
//! and returns. The `on_each_*!` macros of lb-lab declare their variants
//! with it, so no test body repeats the gate.
//!
//! Written on `proc_macro` alone (no syn): it only needs to find the
//! function's body, the last token of `fn name() { ... }`.

use proc_macro::{Delimiter, Group, Span, TokenStream, TokenTree};

/// The gate put first in the body; the test harness names the thread after
/// the test, which is how the gate names it.
const GATE: &str = "if !::lb_lab::privilege::require_root() { return; }";

/// Declares a test that needs root: `#[privileged_test] fn name() { .. }`
/// in place of `#[test]`.
#[proc_macro_attribute]
pub fn privileged_test(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        return error(Span::call_site(), "#[privileged_test] takes no arguments");
    }
    let mut tokens: Vec<TokenTree> = item.into_iter().collect();
    let is_fn = tokens
        .iter()
        .any(|t| matches!(t, TokenTree::Ident(i) if i.to_string() == "fn"));
    let body = match tokens.pop() {
        Some(TokenTree::Group(g)) if is_fn && g.delimiter() == Delimiter::Brace => g,
        other => {
            let span = other.map_or_else(Span::call_site, |t| t.span());
            return error(span, "#[privileged_test] goes on a test function");
        }
    };
    let mut stream: TokenStream = GATE.parse().expect("the gate parses");
    stream.extend(body.stream());
    let mut gated = Group::new(Delimiter::Brace, stream);
    gated.set_span(body.span());
    tokens.push(TokenTree::Group(gated));
    let mut out: TokenStream = "#[test]".parse().expect("#[test] parses");
    out.extend(tokens);
    out
}

/// A `compile_error!` at `span`.
fn error(span: Span, message: &str) -> TokenStream {
    let tokens: TokenStream = format!("compile_error!({message:?});")
        .parse()
        .expect("compile_error! parses");
    tokens
        .into_iter()
        .map(|mut t| {
            t.set_span(span);
            t
        })
        .collect()
}
