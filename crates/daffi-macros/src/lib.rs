//! Procedural macros for [daffi](https://docs.rs/daffi). Use them through `daffi::callback`.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{format_ident, quote, ToTokens};
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
/// emits a hidden argument struct (so positional and named arguments both decode), a
/// shim, and an `inventory` submission that registers the shim on every node this
/// program starts. A return type spelled `Result<..>` sends `Err(e)` to the caller as a
/// remote error (`e` must implement `Display`); any other return type must implement
/// `serde::Serialize`. Arguments must be owned `DeserializeOwned` types: generics,
/// `impl Trait` and borrowed arguments are refused at compile time.
#[proc_macro_attribute]
pub fn callback(attr: TokenStream, item: TokenStream) -> TokenStream {
    let attr = syn::parse_macro_input!(attr as CallbackAttr);
    let item = syn::parse_macro_input!(item as syn::Item);
    let expanded = match item {
        syn::Item::Fn(f) => expand_fn(attr, f),
        other => Err(syn::Error::new(
            other.span(),
            "#[callback] applies to functions (sync or async)",
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
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        return Err(syn::Error::new(
            sig.generics.span(),
            "#[callback] functions cannot be generic: the remote caller cannot choose a type; use concrete types",
        ));
    }
    let params = sig
        .inputs
        .iter()
        .map(param)
        .collect::<syn::Result<Vec<Param>>>()?;
    if let ReturnType::Type(_, ty) = &sig.output {
        reject_unsupported(ty, "return type")?;
    }

    let fn_name = &sig.ident;
    let exposed = attr
        .name
        .map(|n| n.value())
        .unwrap_or_else(|| fn_name.to_string());
    let signature = format!(
        "{exposed}({})",
        params
            .iter()
            .map(|p| format!("{}: {}", p.ident, p.ty.to_token_stream()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let idents: Vec<&syn::Ident> = params.iter().map(|p| &p.ident).collect();
    let types: Vec<&Type> = params.iter().map(|p| &p.ty).collect();
    let args_struct = format_ident!("__DaffiArgs_{}", fn_name);

    let decode = if params.is_empty() {
        quote! { let _ = &payload; }
    } else {
        quote! {
            let #args_struct { #(#idents),* } =
                ::daffi::__private::decode_args::<#args_struct>(#signature, &payload)?;
        }
    };
    let args_def = if params.is_empty() {
        quote! {}
    } else {
        quote! {
            #[derive(::daffi::__private::serde::Deserialize)]
            #[serde(crate = "::daffi::__private::serde")]
            struct #args_struct { #(#idents: #types),* }
        }
    };
    let encode = if returns_result(&sig.output) {
        quote! {
            match __ret {
                ::core::result::Result::Ok(v) => ::daffi::__private::encode_reply(&v),
                ::core::result::Result::Err(e) => ::core::result::Result::Err(
                    ::daffi::__private::CallbackFailure::failed(e),
                ),
            }
        }
    } else {
        quote! { ::daffi::__private::encode_reply(&__ret) }
    };

    let (shim, handler) = if sig.asyncness.is_some() {
        (
            quote! {
                fn __daffi_shim(
                    payload: ::daffi::__private::Bytes,
                ) -> ::daffi::__private::BoxFuture<::daffi::__private::Outcome> {
                    ::std::boxed::Box::pin(async move {
                        #decode
                        let __ret = #fn_name(#(#idents),*).await;
                        #encode
                    })
                }
            },
            quote! { Async },
        )
    } else {
        (
            quote! {
                fn __daffi_shim(payload: ::daffi::__private::Bytes) -> ::daffi::__private::Outcome {
                    #decode
                    let __ret = #fn_name(#(#idents),*);
                    #encode
                }
            },
            quote! { Sync },
        )
    };

    Ok(quote! {
        #f

        #[doc(hidden)]
        #[allow(non_camel_case_types, non_snake_case, clippy::needless_question_mark)]
        const _: () = {
            #args_def
            #shim
            ::daffi::__private::inventory::submit! {
                ::daffi::__private::StaticCallback {
                    name: #exposed,
                    handler: ::daffi::__private::StaticHandler::#handler(__daffi_shim),
                }
            }
        };
    })
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
            reject_unsupported(&pt.ty, "argument")?;
            Ok(Param {
                ident,
                ty: (*pt.ty).clone(),
            })
        }
    }
}

/// Refuses borrowed types, lifetimes and `impl Trait`, with a message that says why.
fn reject_unsupported(ty: &Type, what: &str) -> syn::Result<()> {
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
            format!("#[callback] {what}s must be owned (e.g. `String`, not `&str`): data arrives from another process"),
        )),
        Some((span, _)) => Err(syn::Error::new(
            span,
            format!("#[callback] {what}s cannot be `impl Trait`: name a concrete type"),
        )),
    }
}

/// Whether the declared return type is spelled `Result<..>` (std's, an alias like
/// `anyhow::Result`, or `daffi::Result`).
fn returns_result(output: &ReturnType) -> bool {
    match output {
        ReturnType::Type(_, ty) => match &**ty {
            Type::Path(p) => p.path.segments.last().is_some_and(|s| s.ident == "Result"),
            _ => false,
        },
        ReturnType::Default => false,
    }
}
