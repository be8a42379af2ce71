//! Procedural macros for [daffi](https://docs.rs/daffi). Use them through `daffi::callback`.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{format_ident, quote, ToTokens};
use syn::ext::IdentExt;
use syn::parse::{Parse, ParseStream};
use syn::spanned::Spanned;
use syn::visit::Visit;
use syn::{FnArg, ItemFn, LitStr, Pat, ReturnType, Token, Type};

/// Exposes a function to every other node connected to the same controller.
///
/// ```ignore
/// #[daffi::callback]
/// fn add(a: i64, b: i64) -> i64 { a + b }
///
/// #[daffi::callback(name = "sub")]
/// async fn subtract(a: i64, b: i64) -> Result<i64, String> { Ok(a - b) }
/// ```
///
/// The function is emitted unchanged and stays callable locally. Beside it the macro
/// emits a shim (which decodes arguments given by position or by name) and an
/// `inventory` submission that registers the shim on every node this program starts.
/// A function of one parameter also takes a struct or map as that argument
/// (`.args(person)`), unless the map is `{"p": value}` for a parameter `p`. A return type spelled `Result<..>` sends `Err(e)` to the caller as a
/// remote error (`e` must implement `Display`); any other return type must implement
/// `serde::Serialize`. Arguments must be owned `DeserializeOwned` types: generics,
/// `impl Trait` and borrowed arguments are refused at compile time. One parameter, in
/// any position, may be a `daffi::Incoming<T>`: the items the caller streams with
/// `Call::stream_from` (the caller's `.args(..)` carries the others).
///
/// A plain `fn` returning `impl Iterator<Item = T>` (or `impl IntoIterator`) or
/// `impl Stream<Item = T>` streams its items (`T: Serialize`, the iterator or stream
/// `Send + 'static`): callers read them with `Call::stream`. An iterator is advanced on
/// the node's sync callback threads, a stream polled as a task. An `async fn` cannot
/// return a stream (refused at compile time): return `impl Stream` from a plain `fn`.
///
/// ```ignore
/// #[daffi::callback]
/// fn count_to(n: u64) -> impl Iterator<Item = u64> { 1..=n }
/// ```
///
/// On an inherent `impl` block (a *callback group*), every `pub` method is exposed under
/// its own name; private ones never are. Associated functions (no `self`) are served as
/// soon as a node starts; `&self` methods once an instance is registered with
/// `Global::register_instance`, which accepts one instance per type (the group is a
/// singleton). `&mut self` and `self` receivers are refused: calls run concurrently.
///
/// ```ignore
/// struct Calc { k: i64 }
///
/// #[daffi::callback]
/// impl Calc {
///     pub fn mul(&self, a: i64) -> i64 { a * self.k }
///     pub fn version() -> String { "1".into() }
///     fn helper(&self) {}            // not exposed
/// }
/// ```
#[proc_macro_attribute]
pub fn callback(attr: TokenStream, item: TokenStream) -> TokenStream {
    let attr = syn::parse_macro_input!(attr as CallbackAttr);
    let item = syn::parse_macro_input!(item as syn::Item);
    let expanded = match item {
        syn::Item::Fn(f) => expand_fn(attr, f),
        syn::Item::Impl(block) => expand_impl(attr, block),
        other => Err(syn::Error::new(
            other.span(),
            "#[callback] applies to functions (sync or async) and `impl` blocks",
        )),
    };
    expanded
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// `#[callback]` or `#[callback(name = "exposed")]`.
struct CallbackAttr {
    name: Option<LitStr>,
}

impl Parse for CallbackAttr {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        if input.is_empty() {
            return Ok(CallbackAttr { name: None });
        }
        let key: syn::Ident = input.parse()?;
        if key != "name" {
            return Err(syn::Error::new(
                key.span(),
                "unknown #[callback] option; the only one is `name = \"...\"`",
            ));
        }
        input.parse::<Token![=]>()?;
        let name: LitStr = input.parse()?;
        if name.value().is_empty() {
            return Err(syn::Error::new(
                name.span(),
                "a callback name cannot be empty",
            ));
        }
        if name.value().chars().any(char::is_control) {
            return Err(syn::Error::new(
                name.span(),
                "a callback name cannot hold control characters (a newline would forge log lines)",
            ));
        }
        if !input.is_empty() {
            return Err(input.error("expected only `name = \"...\"`"));
        }
        Ok(CallbackAttr { name: Some(name) })
    }
}

/// One parameter of a callback.
struct Param {
    ident: syn::Ident,
    ty: Type,
}

fn expand_fn(attr: CallbackAttr, f: ItemFn) -> syn::Result<TokenStream2> {
    let sig = &f.sig;
    let params = check_signature(sig, false)?;
    let fn_name = &sig.ident;
    let exposed = attr
        .name
        .map(|n| n.value())
        .unwrap_or_else(|| fn_name.to_string());
    let shim_name = format_ident!("__daffi_shim_{}", fn_name);
    let static_shim = shim(sig, &params, &exposed, quote! { #fn_name }, &shim_name);
    Ok(quote! {
        #f

        #[doc(hidden)]
        #[allow(non_camel_case_types, non_snake_case)]
        const _: () = {
            #static_shim
        };
    })
}

/// `#[callback]` on an `impl` block: `pub` associated functions are registered at once;
/// `pub` `&self` methods once an instance is given to `Global::register_instance`.
fn expand_impl(attr: CallbackAttr, block: syn::ItemImpl) -> syn::Result<TokenStream2> {
    if let Some(name) = attr.name {
        return Err(syn::Error::new(
            name.span(),
            "`name = ..` applies to functions; methods are exposed under their own names",
        ));
    }
    if block.trait_.is_some() {
        return Err(syn::Error::new(
            block.span(),
            "#[callback] applies to inherent `impl` blocks, not trait impls",
        ));
    }
    if !block.generics.params.is_empty() {
        return Err(syn::Error::new(
            block.generics.span(),
            "#[callback] impl blocks cannot be generic: the remote caller cannot choose a type",
        ));
    }
    let self_ty = &block.self_ty;
    let mut statics = Vec::new();
    let mut methods = Vec::new();
    for item in &block.items {
        let syn::ImplItem::Fn(method) = item else {
            continue;
        };
        if !matches!(method.vis, syn::Visibility::Public(_)) {
            continue; // private methods are never exposed
        }
        let sig = &method.sig;
        let name = &sig.ident;
        let exposed = name.to_string();
        match sig.receiver() {
            None => {
                let params = check_signature(sig, false)?;
                let shim_name = format_ident!("__daffi_shim_{}", name);
                statics.push(shim(sig, &params, &exposed, quote! { <#self_ty>::#name }, &shim_name));
            }
            Some(r) if r.reference.is_some() && r.mutability.is_none() && r.colon_token.is_none() => {
                let params = check_signature(sig, true)?;
                methods.push(method_handler(sig, &params, &exposed));
            }
            Some(r) => {
                return Err(syn::Error::new(
                    r.span(),
                    "callback methods take `&self`: calls run concurrently, so use interior mutability (a Mutex or atomics) for state",
                ))
            }
        }
    }
    Ok(quote! {
        #block

        #[doc(hidden)]
        #[allow(non_camel_case_types, non_snake_case)]
        const _: () = {
            #(#statics)*

            impl ::daffi::CallbackGroup for #self_ty {
                fn __daffi_methods(
                    this: ::std::sync::Arc<Self>,
                ) -> ::std::vec::Vec<(&'static str, ::daffi::__private::Handler)> {
                    ::std::vec![#(#methods),*]
                }
            }
        };
    })
}

/// Checks what a callback's signature may contain; returns its parameters (without the
/// receiver).
fn check_signature(sig: &syn::Signature, method: bool) -> syn::Result<Vec<Param>> {
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        return Err(syn::Error::new(
            sig.generics.span(),
            "#[callback] functions cannot be generic: the remote caller cannot choose a type; use concrete types",
        ));
    }
    if sig.asyncness.is_some() && returns(&sig.output) != Returns::Value {
        return Err(syn::Error::new(
            sig.output.span(),
            "an async #[callback] cannot return a stream: make it a plain `fn` returning `impl Stream` (the stream is polled as a task)",
        ));
    }
    // Return types need only `Serialize`: borrowed and `impl Serialize` results are
    // encoded before the shim returns, so the compiler checks them as usual.
    let params: Vec<Param> = sig
        .inputs
        .iter()
        .skip(usize::from(method))
        .map(param)
        .collect::<syn::Result<_>>()?;
    if params.len() > MAX_PARAMS {
        return Err(syn::Error::new(
            sig.inputs.span(),
            format!(
                "#[callback] functions take at most {MAX_PARAMS} parameters; take a struct instead"
            ),
        ));
    }
    Ok(params)
}

/// As many parameters as daffi decodes (a tuple of up to 16).
const MAX_PARAMS: usize = 16;

/// The pieces every shim shares: decoding the arguments, and encoding the result.
struct ShimParts {
    /// Decodes the arguments into `__args`, when the shim is called.
    decode: TokenStream2,
    /// Unpacks `__args` into the parameters, or returns their failure.
    unpack: TokenStream2,
    encode: TokenStream2,
    idents: Vec<syn::Ident>,
}

fn shim_parts(sig: &syn::Signature, params: &[Param], exposed: &str) -> ShimParts {
    let idents: Vec<syn::Ident> = params.iter().map(|p| p.ident.clone()).collect();
    let names: Vec<String> = idents.iter().map(|i| i.unraw().to_string()).collect();
    let type_texts: Vec<String> = params.iter().map(|p| type_text(&p.ty)).collect();
    let types: Vec<&Type> = params.iter().map(|p| &p.ty).collect();
    // Decoded before an async callback's future is made: the request's stream of
    // arguments (`Incoming`) is offered only while the shim is called.
    let decode = quote! {
        const SIGNATURE: ::daffi::__private::Signature<'static> = ::daffi::__private::Signature {
            callback: #exposed,
            names: &[#(#names),*],
            types: &[#(#type_texts),*],
        };
        let __args = ::daffi::__private::decode_args::<(#(#types,)*)>(&SIGNATURE, payload);
    };
    let unpack = quote! { let (#(#idents,)*) = __args?; };
    let encode = match returns(&sig.output) {
        Returns::Iterator => quote! { Ok(::daffi::__private::iter_items(__ret)) },
        Returns::Stream => quote! { Ok(::daffi::__private::stream_items(__ret)) },
        Returns::Value => encode_value(&sig.output),
    };
    ShimParts {
        decode,
        unpack,
        encode,
        idents,
    }
}

/// Encodes a callback's one result (`__ret`), or its `Err` as a failure.
fn encode_value(output: &ReturnType) -> TokenStream2 {
    if returns_result(output) {
        quote! {
            match __ret {
                ::core::result::Result::Ok(v) => ::daffi::__private::encode_reply(v),
                ::core::result::Result::Err(e) => ::core::result::Result::Err(
                    ::daffi::__private::CallbackFailure::failed(e),
                ),
            }
        }
    } else {
        quote! { ::daffi::__private::encode_reply(__ret) }
    }
}

/// A type as the user wrote it, spaced as rustfmt would: `Vec<Vec<i64>>`, not
/// `Vec < Vec < i64 > >`.
fn type_text(ty: &Type) -> String {
    let spaced = ty.to_token_stream().to_string();
    let mut text = String::with_capacity(spaced.len());
    let mut chars = spaced.chars().peekable();
    while let Some(c) = chars.next() {
        let next = chars.peek().copied();
        let prev = text.chars().last();
        let tight = c == ' '
            && (matches!(next, Some('<' | '>' | ',' | ':' | ')' | ']' | ';'))
                || matches!(prev, Some('<' | '&' | ':' | '(' | '[')));
        if !tight {
            text.push(c);
        }
    }
    text
}

/// A free-standing shim for `callable` and its `inventory` submission.
fn shim(
    sig: &syn::Signature,
    params: &[Param],
    exposed: &str,
    callable: TokenStream2,
    shim_name: &syn::Ident,
) -> TokenStream2 {
    let ShimParts {
        decode,
        unpack,
        encode,
        idents,
    } = shim_parts(sig, params, exposed);
    let (body, kind) = if sig.asyncness.is_some() {
        (
            quote! {
                fn #shim_name(
                    payload: ::daffi::__private::Bytes,
                ) -> ::daffi::__private::BoxFuture<::daffi::__private::Outcome> {
                    #decode
                    ::std::boxed::Box::pin(async move {
                        #unpack
                        let __ret = #callable(#(#idents),*).await;
                        #encode
                    })
                }
            },
            quote! { Async },
        )
    } else {
        let (output, kind) = returns(&sig.output).sync_shim();
        (
            quote! {
                fn #shim_name(payload: ::daffi::__private::Bytes) -> #output {
                    #decode
                    #unpack
                    let __ret = #callable(#(#idents),*);
                    #encode
                }
            },
            kind,
        )
    };
    quote! {
        #body
        ::daffi::__private::inventory::submit! {
            ::daffi::__private::StaticCallback {
                name: #exposed,
                handler: ::daffi::__private::StaticHandler::#kind(#shim_name),
            }
        }
    }
}

/// `(name, handler)` for one `&self` method, capturing the shared instance.
fn method_handler(sig: &syn::Signature, params: &[Param], exposed: &str) -> TokenStream2 {
    let ShimParts {
        decode,
        unpack,
        encode,
        idents,
    } = shim_parts(sig, params, exposed);
    let name = &sig.ident;
    let handler = if sig.asyncness.is_some() {
        quote! {
            ::daffi::__private::Handler::Async(::std::sync::Arc::new(
                move |payload: ::daffi::__private::Bytes|
                    -> ::daffi::__private::BoxFuture<::daffi::__private::Outcome> {
                    let this = this.clone();
                    #decode
                    ::std::boxed::Box::pin(async move {
                        #unpack
                        let __ret = this.#name(#(#idents),*).await;
                        #encode
                    })
                },
            ))
        }
    } else {
        let (output, kind) = returns(&sig.output).sync_shim();
        quote! {
            ::daffi::__private::Handler::#kind(::std::sync::Arc::new(
                move |payload: ::daffi::__private::Bytes| -> #output {
                    #decode
                    #unpack
                    let __ret = this.#name(#(#idents),*);
                    #encode
                },
            ))
        }
    };
    quote! {
        {
            let this = this.clone();
            (#exposed, #handler)
        }
    }
}

fn param(arg: &FnArg) -> syn::Result<Param> {
    match arg {
        FnArg::Receiver(r) => Err(syn::Error::new(
            r.span(),
            "#[callback] on a method: put #[callback] on the `impl` block instead",
        )),
        FnArg::Typed(pt) => {
            let ident = match &*pt.pat {
                Pat::Ident(pi) if pi.subpat.is_none() => pi.ident.clone(),
                other => {
                    return Err(syn::Error::new(
                        other.span(),
                        "#[callback] parameters must be plain names (`a: i64`), not patterns",
                    ))
                }
            };
            reject_unsupported(&pt.ty)?;
            Ok(Param {
                ident,
                ty: (*pt.ty).clone(),
            })
        }
    }
}

/// Refuses borrowed argument types and `impl Trait`, with a message that says why.
fn reject_unsupported(ty: &Type) -> syn::Result<()> {
    struct Finder(Option<(Span, &'static str)>);
    impl<'ast> Visit<'ast> for Finder {
        fn visit_type_reference(&mut self, r: &'ast syn::TypeReference) {
            self.0.get_or_insert((r.span(), "borrowed"));
        }
        fn visit_lifetime(&mut self, l: &'ast syn::Lifetime) {
            self.0.get_or_insert((l.span(), "borrowed"));
        }
        fn visit_type_impl_trait(&mut self, t: &'ast syn::TypeImplTrait) {
            self.0.get_or_insert((t.span(), "impl Trait"));
        }
    }
    let mut finder = Finder(None);
    finder.visit_type(ty);
    match finder.0 {
        None => Ok(()),
        Some((span, "borrowed")) => Err(syn::Error::new(
            span,
            "#[callback] arguments must be owned (e.g. `String`, not `&str`): data arrives from another process",
        )),
        Some((span, _)) => Err(syn::Error::new(
            span,
            "#[callback] arguments cannot be `impl Trait`: name a concrete type",
        )),
    }
}

/// Whether the declared return type is spelled `Result<..>` (std's, an alias like
/// `anyhow::Result`, or `daffi::Result`).
/// What a callback returns: one value, or items to stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Returns {
    Value,
    /// `impl Iterator` or `impl IntoIterator`: advanced on the node's sync threads.
    Iterator,
    /// `impl Stream`: polled as a task.
    Stream,
}

/// Whether `output` is an `impl Iterator`/`impl IntoIterator` or an `impl Stream`.
fn returns(output: &ReturnType) -> Returns {
    let ReturnType::Type(_, ty) = output else {
        return Returns::Value;
    };
    let Type::ImplTrait(it) = &**ty else {
        return Returns::Value;
    };
    for bound in &it.bounds {
        if let syn::TypeParamBound::Trait(t) = bound {
            match t
                .path
                .segments
                .last()
                .map(|s| s.ident.to_string())
                .as_deref()
            {
                Some("Iterator" | "IntoIterator") => return Returns::Iterator,
                Some("Stream") => return Returns::Stream,
                _ => {}
            }
        }
    }
    Returns::Value
}

impl Returns {
    /// What the sync shim returns, and the handler it becomes.
    fn sync_shim(self) -> (TokenStream2, TokenStream2) {
        match self {
            Returns::Value => (quote! { ::daffi::__private::Outcome }, quote! { Sync }),
            Returns::Iterator => (
                quote! { ::core::result::Result<::daffi::__private::ItemIter, ::daffi::__private::CallbackFailure> },
                quote! { SyncStream },
            ),
            Returns::Stream => (
                quote! { ::core::result::Result<::daffi::__private::ItemStream, ::daffi::__private::CallbackFailure> },
                quote! { AsyncStream },
            ),
        }
    }
}

fn returns_result(output: &ReturnType) -> bool {
    match output {
        ReturnType::Type(_, ty) => match &**ty {
            Type::Path(p) => p.path.segments.last().is_some_and(|s| s.ident == "Result"),
            _ => false,
        },
        ReturnType::Default => false,
    }
}
