//! The keys of the config types, read from the types themselves: a serde `Deserializer`
//! that, instead of reading a file, asks `Config`'s `Deserialize` impl which fields each
//! struct has and what each field's type is. The configuration reference
//! (`config::reference`, `distill init`, docs/configuration.md) is built on this list,
//! so a field added to a section shows up there (and fails its tests until documented).

use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};

/// What a key holds, as TOML sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Bool,
    Int,
    Float,
    Str,
    /// A string out of a fixed set (a Rust enum of unit variants, by their TOML names).
    Enum(&'static [&'static str]),
    List(Box<Kind>),
    /// A table of free-form keys (e.g. `[cost.gpu_hour]`).
    Map(Box<Kind>),
}

impl Kind {
    /// The type as the reference shows it.
    pub fn describe(&self) -> String {
        match self {
            Kind::Bool => "boolean".into(),
            Kind::Int => "integer".into(),
            Kind::Float => "number".into(),
            Kind::Str => "string".into(),
            Kind::Enum(names) => {
                let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
                format!("one of {}", quoted.join(", "))
            }
            Kind::List(inner) => format!("list of {}", plural(inner)),
            Kind::Map(inner) => format!("table of {}", plural(inner)),
        }
    }
}

fn plural(k: &Kind) -> String {
    match k {
        Kind::Bool => "booleans".into(),
        Kind::Int => "integers".into(),
        Kind::Float => "numbers".into(),
        Kind::Str | Kind::Enum(_) => "strings".into(),
        other => other.describe(),
    }
}

/// One key of the config: its dotted path (`student.train.lr`), its type, and whether
/// it may be left unset (an `Option` field, absent from the resolved config).
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    pub key: String,
    pub kind: Kind,
    pub optional: bool,
}

/// Other names of a key (`#[serde(alias)]`), which serde lists among the fields; the
/// walk skips them (the reference mentions them in the key's doc).
pub const ALIASES: [&str; 1] = ["distill.alpha"];

/// Every key of `T`, in declaration order, sections (nested structs) walked in place.
pub fn fields<'de, T: de::Deserialize<'de>>() -> Result<Vec<Field>, WalkError> {
    let mut out = Vec::new();
    let walk = Walk {
        path: String::new(),
        optional: false,
        out: &mut out,
    };
    // The walk feeds every field a placeholder value; only the field list matters.
    T::deserialize(walk).map_err(|e| {
        WalkError(format!(
            "walking the config types: {e} (a field with #[serde(alias)] needs its alias in config::schema::ALIASES)"
        ))
    })?;
    Ok(out)
}

/// The deserializer: at `path`, records what the visitor asks for.
struct Walk<'a> {
    path: String,
    optional: bool,
    out: &'a mut Vec<Field>,
}

impl Walk<'_> {
    fn record(&mut self, kind: Kind) {
        self.out.push(Field {
            key: self.path.clone(),
            kind,
            optional: self.optional,
        });
    }

    /// The kind of one element (of a list or a table), walked apart and not recorded.
    fn element<'de, S: DeserializeSeed<'de>>(&self, seed: S) -> Result<(S::Value, Kind), WalkError> {
        let mut inner = Vec::new();
        let v = seed.deserialize(Walk {
            path: String::new(),
            optional: false,
            out: &mut inner,
        })?;
        let kind = inner.into_iter().next().map(|f| f.kind).unwrap_or(Kind::Str);
        Ok((v, kind))
    }
}

#[derive(Debug)]
pub struct WalkError(String);

impl std::fmt::Display for WalkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WalkError {}

impl de::Error for WalkError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        WalkError(msg.to_string())
    }
}

macro_rules! leaf {
    ($($method:ident => $kind:expr, $visit:ident($value:expr);)*) => {
        $(fn $method<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, WalkError> {
            self.record($kind);
            visitor.$visit($value)
        })*
    };
}

impl<'de> de::Deserializer<'de> for Walk<'_> {
    type Error = WalkError;

    leaf! {
        deserialize_bool => Kind::Bool, visit_bool(false);
        deserialize_i8 => Kind::Int, visit_i64(0);
        deserialize_i16 => Kind::Int, visit_i64(0);
        deserialize_i32 => Kind::Int, visit_i64(0);
        deserialize_i64 => Kind::Int, visit_i64(0);
        deserialize_u8 => Kind::Int, visit_u64(0);
        deserialize_u16 => Kind::Int, visit_u64(0);
        deserialize_u32 => Kind::Int, visit_u64(0);
        deserialize_u64 => Kind::Int, visit_u64(0);
        deserialize_f32 => Kind::Float, visit_f64(0.0);
        deserialize_f64 => Kind::Float, visit_f64(0.0);
        deserialize_char => Kind::Str, visit_char('x');
        deserialize_str => Kind::Str, visit_str("");
        deserialize_string => Kind::Str, visit_str("");
        deserialize_bytes => Kind::Str, visit_bytes(b"");
        deserialize_byte_buf => Kind::Str, visit_bytes(b"");
    }

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, WalkError> {
        Err(WalkError(format!(
            "{}: a config type must not need deserialize_any",
            self.path
        )))
    }

    fn deserialize_option<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, WalkError> {
        self.optional = true;
        visitor.visit_some(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, WalkError> {
        let mut one = OneElement {
            walk: &self,
            kind: None,
        };
        let v = visitor.visit_seq(&mut one)?;
        let kind = one.kind.take().unwrap_or(Kind::Str);
        self.record(Kind::List(Box::new(kind)));
        Ok(v)
    }

    fn deserialize_map<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, WalkError> {
        let mut one = OneEntry {
            walk: &self,
            kind: None,
            done: false,
        };
        let v = visitor.visit_map(&mut one)?;
        let kind = one.kind.take().unwrap_or(Kind::Str);
        self.record(Kind::Map(Box::new(kind)));
        Ok(v)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, WalkError> {
        visitor.visit_map(StructFields {
            path: self.path,
            out: self.out,
            fields,
            next: 0,
        })
    }

    fn deserialize_enum<V: Visitor<'de>>(
        mut self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, WalkError> {
        self.record(Kind::Enum(variants));
        let first = variants.first().copied().unwrap_or_default();
        visitor.visit_enum(IntoDeserializer::<WalkError>::into_deserializer(first))
    }

    serde::forward_to_deserialize_any! {
        unit unit_struct newtype_struct tuple tuple_struct identifier ignored_any
    }
}

/// A struct's fields, each walked at `path.field`.
struct StructFields<'a> {
    path: String,
    out: &'a mut Vec<Field>,
    fields: &'static [&'static str],
    next: usize,
}

impl<'de> MapAccess<'de> for StructFields<'_> {
    type Error = WalkError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, WalkError> {
        while self
            .fields
            .get(self.next)
            .is_some_and(|name| ALIASES.contains(&self.key(name).as_str()))
        {
            self.next += 1;
        }
        match self.fields.get(self.next) {
            Some(name) => seed
                .deserialize(IntoDeserializer::<WalkError>::into_deserializer(*name))
                .map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, WalkError> {
        let name = self.fields[self.next.min(self.fields.len().saturating_sub(1))];
        self.next += 1;
        let path = self.key(name);
        seed.deserialize(Walk {
            path,
            optional: false,
            out: self.out,
        })
    }
}

impl StructFields<'_> {
    fn key(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }
}

/// A list of one element, to learn the element's kind.
struct OneElement<'w, 'a> {
    walk: &'w Walk<'a>,
    kind: Option<Kind>,
}

impl<'de> SeqAccess<'de> for OneElement<'_, '_> {
    type Error = WalkError;

    fn next_element_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<Option<S::Value>, WalkError> {
        if self.kind.is_some() {
            return Ok(None);
        }
        let (v, kind) = self.walk.element(seed)?;
        self.kind = Some(kind);
        Ok(Some(v))
    }
}

/// A table of one entry, to learn the value's kind.
struct OneEntry<'w, 'a> {
    walk: &'w Walk<'a>,
    kind: Option<Kind>,
    done: bool,
}

impl<'de> MapAccess<'de> for OneEntry<'_, '_> {
    type Error = WalkError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, WalkError> {
        if self.done {
            return Ok(None);
        }
        self.done = true;
        seed.deserialize(IntoDeserializer::<WalkError>::into_deserializer("key"))
            .map(Some)
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, WalkError> {
        let (v, kind) = self.walk.element(seed)?;
        self.kind = Some(kind);
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_every_section_with_types() {
        let all = fields::<crate::config::Config>().expect("the walk reaches every field");
        let get = |k: &str| all.iter().find(|f| f.key == k).cloned();
        let lr = get("student.train.lr").expect("student.train.lr is walked");
        assert_eq!((lr.kind, lr.optional), (Kind::Float, false));
        let min_lr = get("teacher.train.min_lr").expect("teacher.train.min_lr");
        assert_eq!((min_lr.kind, min_lr.optional), (Kind::Float, true));
        let layers = get("student.prune_layers").expect("student.prune_layers");
        assert_eq!(layers.kind, Kind::List(Box::new(Kind::Int)));
        let prices = get("cost.gpu_hour").expect("cost.gpu_hour");
        assert_eq!(prices.kind, Kind::Map(Box::new(Kind::Float)));
        let backend = get("distributed.backend").expect("distributed.backend");
        assert_eq!(backend.kind, Kind::Enum(&["none", "mpi", "nccl"]));
        assert!(get("teacher.hub").is_some_and(|f| f.optional && f.kind == Kind::Str));
        assert!(get("alpha").is_none() && get("distill.alpha").is_none());
    }
}
