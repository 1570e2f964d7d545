//! [`text_enum!`](crate::text_enum!): enums whose every variant is one fixed
//! word on the wire (a condition reason, a metric label value), so the
//! word is written once, beside its variant, and nowhere else.

/// Declares an enum of fixed words: each variant with the text it stands
/// for. The enum gets `as_str()`, `ALL` (every variant, in order),
/// `Display` (the text) and `EncodeLabelValue` (usable as a
/// `prometheus-client` label field).
///
/// ```
/// tidepool_common::text_enum! {
///     /// How a write ended.
///     pub enum WriteResult {
///         /// It was applied.
///         Ok => "ok",
///         /// It failed.
///         Error => "error",
///     }
/// }
/// assert_eq!(WriteResult::Error.as_str(), "error");
/// assert_eq!(WriteResult::ALL, [WriteResult::Ok, WriteResult::Error]);
/// assert_eq!(WriteResult::Ok.to_string(), "ok");
/// ```
#[macro_export]
macro_rules! text_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: [Self; [$(stringify!($variant)),+].len()] = [$(Self::$variant),+];

            /// The text this value stands for.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( Self::$variant => $text ),+
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl $crate::text_enum::EncodeLabelValue for $name {
            fn encode(
                &self,
                encoder: &mut $crate::text_enum::LabelValueEncoder<'_>,
            ) -> ::std::fmt::Result {
                ::std::fmt::Write::write_str(encoder, self.as_str())
            }
        }
    };
}

// What the macro's expansion names, so a crate using it needs no
// `prometheus-client` import of its own.
#[doc(hidden)]
pub use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

#[cfg(test)]
mod tests {
    crate::text_enum! {
        /// A test enum.
        enum Op {
            /// Made.
            Create => "create",
            /// Removed.
            Delete => "delete",
        }
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
    struct OpLabel {
        op: Op,
    }

    #[test]
    fn a_value_is_its_text_everywhere() {
        assert_eq!(Op::ALL.map(Op::as_str), ["create", "delete"]);
        assert_eq!(format!("{}", Op::Delete), "delete");
        let mut registry = prometheus_client::registry::Registry::default();
        let family = prometheus_client::metrics::family::Family::<
            OpLabel,
            prometheus_client::metrics::counter::Counter,
        >::default();
        registry.register("ops", "Ops", family.clone());
        family.get_or_create(&OpLabel { op: Op::Create }).inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("ops_total{op=\"create\"} 1"), "{text}");
    }
}
