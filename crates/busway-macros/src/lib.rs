//! Derive macros for busway.
//!
//! Use them through the `busway` crate (`use busway::prelude::*;` brings `Message` in), not
//! directly: the generated code names `::busway` paths. This crate follows the facade's version
//! and is not meant to be depended on by itself.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::quote;
use syn::{Data, DeriveInput, Fields, LitStr, Path, parse_macro_input};

/// Derives `busway::Message` for a struct or enum.
///
/// Container attributes (all optional):
///
/// - `#[message(urn = "urn:message:Contracts:OrderPlaced")]` sets the message type URN. A value
///   that does not start with `urn:` gets the `urn:message:` prefix, as MassTransit's
///   `[MessageUrn]` does. Without it the URN is `urn:message:{module.path}:{TypeName}`.
/// - `#[message(entity_name = "Contracts:OrderPlaced")]` names the type's exchange or topic on
///   every transport, as MassTransit's `[EntityName]` does; use it too for a .NET contract
///   whose `[MessageUrn]` differs from its type name (MassTransit names the exchange after the
///   type). See `busway::urn::set_entity_name`.
/// - `#[message(implements(OrderEvent, Auditable))]` declares the contracts (other `Message`
///   types) this one also is, as a .NET class implements interfaces: publishing lists their
///   URNs after its own and routes to their exchanges or topics, so their consumers receive
///   it. Each listed contract's own `implements` are included after it.
/// - A generic contract's URN names its type arguments, per instantiation, as MassTransit's
///   does: `Batch<OrderPlaced>` is `urn:message:Contracts:Batch[[Contracts:OrderPlaced]]`
///   (each type parameter must be a `Message` or a primitive, see
///   `busway::UrnArgument`). `#[message(shared_urn)]` gives every instantiation the
///   one URN instead.
/// - `#[message(crate = "busway_core")]` names the crate that exports `Message` when `busway`
///   is not a direct dependency.
/// - `#[message(snake_case)]` keeps multi-word field names as written on the wire (see below).
///
/// MassTransit (System.Text.Json) writes and reads camelCase names (`orderId`); serde writes a
/// field as it is spelled (`order_id`), which a .NET service would not read. So a struct with
/// a multi-word field and neither `#[serde(rename_all = "...")]` nor a `#[serde(rename)]` on
/// that field is refused with a message saying what to write; `#[message(snake_case)]` says
/// that snake_case is meant.
///
/// Field attributes (on at most one field each):
///
/// - `#[message(key)]`: the field's `Display` form is the message key (Kafka partition key,
///   ordering lane).
/// - `#[message(correlation_id)]`: the field (a `Uuid` or `Option<Uuid>`) is the default
///   correlation id of the message on the wire.
#[proc_macro_derive(Message, attributes(message))]
pub fn derive_message(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(tokens) => tokens.into(),
        Err(err) => err.to_compile_error().into(),
    }
}

struct ContainerOptions {
    urn: Option<LitStr>,
    entity_name: Option<LitStr>,
    implements: Vec<Path>,
    shared_urn: bool,
    krate: Path,
    snake_case: bool,
}

fn container_options(input: &DeriveInput) -> syn::Result<ContainerOptions> {
    let mut urn = None;
    let mut entity_name = None;
    let mut implements: Vec<Path> = Vec::new();
    let mut shared_urn = false;
    let mut krate: Path = syn::parse_quote!(::busway);
    let mut snake_case = false;
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("message")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("urn") {
                let value: LitStr = meta.value()?.parse()?;
                let text = value.value();
                if text.trim().is_empty() {
                    return Err(meta.error("the message URN must not be empty"));
                }
                if text.chars().any(char::is_whitespace) {
                    return Err(meta.error("the message URN must not contain whitespace"));
                }
                let full = if text.starts_with("urn:") {
                    text
                } else {
                    format!("urn:message:{text}")
                };
                urn = Some(LitStr::new(&full, value.span()));
                Ok(())
            } else if meta.path.is_ident("entity_name") {
                let value: LitStr = meta.value()?.parse()?;
                if value.value().trim().is_empty() {
                    return Err(meta.error("the entity name must not be empty"));
                }
                entity_name = Some(value);
                Ok(())
            } else if meta.path.is_ident("implements") {
                meta.parse_nested_meta(|inner| {
                    implements.push(inner.path.clone());
                    Ok(())
                })
            } else if meta.path.is_ident("shared_urn") {
                shared_urn = true;
                Ok(())
            } else if meta.path.is_ident("crate") {
                let value: LitStr = meta.value()?.parse()?;
                krate = value.parse()?;
                Ok(())
            } else if meta.path.is_ident("snake_case") {
                snake_case = true;
                Ok(())
            } else {
                Err(meta.error(
                    "unknown message attribute; expected `urn = \"...\"`, `entity_name = \"...\"`, `implements(..)`, `shared_urn`, `crate = \"...\"` or `snake_case`",
                ))
            }
        })?;
    }
    Ok(ContainerOptions {
        urn,
        entity_name,
        implements,
        shared_urn,
        krate,
        snake_case,
    })
}

/// Whether a `#[serde(..)]` attribute among `attrs` mentions `word` (`rename_all`, `rename`,
/// `flatten`), read from its tokens so every serde form is understood.
fn serde_mentions(attrs: &[syn::Attribute], word: &str) -> bool {
    attrs
        .iter()
        .filter(|a| a.path().is_ident("serde"))
        .any(|a| {
            let syn::Meta::List(list) = &a.meta else {
                return false;
            };
            list.tokens.clone().into_iter().any(|t| match t {
                proc_macro2::TokenTree::Ident(i) => i == word,
                _ => false,
            })
        })
}

/// Refuses a multi-word field that serde would write in snake_case, since MassTransit reads
/// camelCase (see the derive's docs).
fn check_wire_names(input: &DeriveInput, container: &ContainerOptions) -> syn::Result<()> {
    if container.snake_case || serde_mentions(&input.attrs, "rename_all") {
        return Ok(());
    }
    let Data::Struct(data) = &input.data else {
        return Ok(());
    };
    let Fields::Named(named) = &data.fields else {
        return Ok(());
    };
    for field in &named.named {
        let Some(ident) = &field.ident else { continue };
        let name = ident.to_string();
        let name = name.trim_start_matches("r#");
        if !name.trim_matches('_').contains('_')
            || serde_mentions(&field.attrs, "rename")
            || serde_mentions(&field.attrs, "flatten")
        {
            continue;
        }
        let camel = camel_case(name);
        return Err(syn::Error::new(
            ident.span(),
            format!(
                "field `{name}` would go on the wire as `{name}`, but MassTransit writes and \
                 reads `{camel}`: add `#[serde(rename_all = \"camelCase\")]` to the struct, \
                 or `#[serde(rename = \"...\")]` to the field, or `#[message(snake_case)]` to \
                 keep snake_case names"
            ),
        ));
    }
    Ok(())
}

fn camel_case(name: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = !out.is_empty();
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

#[derive(Default)]
struct FieldOptions {
    key: Option<TokenStream2>,
    correlation: Option<TokenStream2>,
}

fn field_options(input: &DeriveInput) -> syn::Result<FieldOptions> {
    let mut out = FieldOptions::default();
    let fields = match &input.data {
        Data::Struct(data) => &data.fields,
        _ => return Ok(out),
    };
    let iter: Box<dyn Iterator<Item = (usize, &syn::Field)>> = match fields {
        Fields::Named(named) => Box::new(named.named.iter().enumerate()),
        Fields::Unnamed(unnamed) => Box::new(unnamed.unnamed.iter().enumerate()),
        Fields::Unit => return Ok(out),
    };
    for (index, field) in iter {
        let access = match &field.ident {
            Some(ident) => quote!(self.#ident),
            None => {
                let index = syn::Index::from(index);
                quote!(self.#index)
            }
        };
        for attr in field.attrs.iter().filter(|a| a.path().is_ident("message")) {
            attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("key") {
                    if out.key.is_some() {
                        return Err(meta.error("only one field can be the message key"));
                    }
                    out.key = Some(access.clone());
                    Ok(())
                } else if meta.path.is_ident("correlation_id") {
                    if out.correlation.is_some() {
                        return Err(meta.error("only one field can be the correlation id"));
                    }
                    out.correlation = Some(access.clone());
                    Ok(())
                } else {
                    Err(meta.error(
                        "unknown message field attribute; expected `key` or `correlation_id`",
                    ))
                }
            })?;
        }
    }
    Ok(out)
}

fn expand(input: &DeriveInput) -> syn::Result<TokenStream2> {
    if let Data::Union(_) = input.data {
        return Err(syn::Error::new(
            Span::call_site(),
            "Message cannot be derived for unions",
        ));
    }
    let container = container_options(input)?;
    check_wire_names(input, &container)?;
    let fields = field_options(input)?;
    let krate = container.krate.clone();
    let krate = &krate;
    let ident = &input.ident;
    let name = ident.to_string();
    let generic = !input.generics.params.is_empty();
    let mut generics = input.generics.clone();
    if generic {
        let where_clause = generics.make_where_clause();
        for param in input.generics.type_params() {
            let ident = &param.ident;
            where_clause.predicates.push(
                syn::parse_quote!(#ident: ::core::marker::Send + ::core::marker::Sync + 'static),
            );
            if !container.shared_urn {
                where_clause
                    .predicates
                    .push(syn::parse_quote!(#ident: #krate::__private::UrnArgument));
            }
        }
        where_clause.predicates.push(syn::parse_quote!(
            Self: #krate::__private::Serialize + #krate::__private::DeserializeOwned
        ));
    }
    let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();

    let make_urn = match &container.urn {
        Some(urn) => quote!(#krate::Urn::from_static(#urn)),
        None => quote!(#krate::Urn::from_module_path(::core::module_path!(), #name)),
    };
    // A generic contract's URN names its arguments, per instantiation, as MassTransit's does.
    let type_params: Vec<_> = input.generics.type_params().map(|p| &p.ident).collect();
    let make_urn = if generic && !container.shared_urn && !type_params.is_empty() {
        quote! {
            #krate::__private::generic_urn(
                #make_urn,
                &[#(<#type_params as #krate::__private::UrnArgument>::urn_argument()),*],
            )
        }
    } else {
        make_urn
    };
    // With an entity name, the URN is made once and the name registered with it.
    let make_urn = match &container.entity_name {
        Some(entity) => quote! {{
            let urn = #make_urn;
            #krate::__private::set_entity_name(&urn, #entity);
            urn
        }},
        None => make_urn,
    };
    let contracts = &container.implements;
    let make_urn = if contracts.is_empty() {
        make_urn
    } else {
        quote! {{
            let urn = #make_urn;
            #krate::__private::set_direct_contracts(
                &urn,
                ::std::vec![#(<#contracts as #krate::Message>::message_type().clone()),*],
            );
            urn
        }}
    };
    let plain = container.entity_name.is_none() && contracts.is_empty();
    let urn_body = match (&container.urn, plain, generic) {
        (Some(urn), true, false) => quote! {
            static URN: #krate::Urn = #krate::Urn::from_static(#urn);
            &URN
        },
        (_, _, false) => quote! {
            static URN: #krate::__private::OnceLock<#krate::Urn> = #krate::__private::OnceLock::new();
            URN.get_or_init(|| #make_urn)
        },
        (_, _, true) => quote! {
            #krate::__private::urn_for_type::<Self>(|| #make_urn)
        },
    };

    let implemented = (!contracts.is_empty()).then(|| {
        let body = if generic {
            quote! {
                #krate::__private::types_for_type::<Self>(|| {
                    let mut out: ::std::vec::Vec<#krate::Urn> = ::std::vec::Vec::new();
                    #(#krate::__private::push_contract::<#contracts>(&mut out);)*
                    out
                })
            }
        } else {
            quote! {
                static TYPES: #krate::__private::OnceLock<::std::vec::Vec<#krate::Urn>> =
                    #krate::__private::OnceLock::new();
                TYPES.get_or_init(|| {
                    let mut out: ::std::vec::Vec<#krate::Urn> = ::std::vec::Vec::new();
                    #(#krate::__private::push_contract::<#contracts>(&mut out);)*
                    out
                })
            }
        };
        quote! {
            fn implemented_types() -> &'static [#krate::Urn] {
                #body
            }
        }
    });

    let key = fields.key.map(|access| {
        quote! {
            fn message_key(&self) -> ::core::option::Option<::std::string::String> {
                ::core::option::Option::Some(::std::string::ToString::to_string(&#access))
            }
        }
    });
    let correlation = fields.correlation.map(|access| {
        quote! {
            fn correlation_id(&self) -> ::core::option::Option<#krate::__private::Uuid> {
                #krate::__private::ToCorrelationId::to_correlation_id(&#access)
            }

            fn has_correlation_id() -> bool {
                true
            }
        }
    });

    Ok(quote! {
        impl #impl_generics #krate::Message for #ident #ty_generics #where_clause {
            fn message_type() -> &'static #krate::Urn {
                #urn_body
            }
            #implemented
            #key
            #correlation
        }
    })
}
