//! Identities the domain code passes around, apart from their wire forms.

use switchyard_proto::v1;

/// One expert of one MoE layer: `layer` as the checkpoint numbers it, `expert` its index (shared
/// experts follow the routed ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ExpertId {
    pub layer: u32,
    pub expert: u32,
}

impl ExpertId {
    pub const fn new(layer: u32, expert: u32) -> Self {
        Self { layer, expert }
    }
}

impl std::fmt::Display for ExpertId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "layer {} expert {}", self.layer, self.expert)
    }
}

impl From<v1::ExpertKey> for ExpertId {
    fn from(key: v1::ExpertKey) -> Self {
        Self { layer: key.layer, expert: key.expert }
    }
}

impl From<ExpertId> for v1::ExpertKey {
    fn from(id: ExpertId) -> Self {
        v1::ExpertKey { layer: id.layer, expert: id.expert }
    }
}

impl std::str::FromStr for ExpertId {
    type Err = String;

    /// The [`Display`](std::fmt::Display) form back: `layer L expert E`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = text.split_whitespace().collect();
        match parts.as_slice() {
            ["layer", layer, "expert", expert] => {
                let number = |part: &str| part.parse::<u32>().map_err(|error| format!("{text:?}: {error}"));
                Ok(Self { layer: number(layer)?, expert: number(expert)? })
            }
            _ => Err(format!("{text:?} is not 'layer L expert E'")),
        }
    }
}

/// The version of a routing table: it increases by one with every change of placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct TableVersion(pub u64);

impl std::fmt::Display for TableVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A layer call's id, chosen by the client and carried to every worker's spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RequestId(pub u64);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_ids_round_trip_through_the_wire_and_their_text() {
        let id = ExpertId::new(3, 7);
        assert_eq!(ExpertId::from(v1::ExpertKey::from(id)), id);
        assert_eq!(id.to_string(), "layer 3 expert 7");
        assert_eq!("layer 3 expert 7".parse::<ExpertId>(), Ok(id));
        assert!("layer three expert 7".parse::<ExpertId>().is_err());
        assert!(ExpertId::new(0, 9) < ExpertId::new(1, 0), "ordered layer-major");
    }
}
