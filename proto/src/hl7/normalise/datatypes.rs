//! Values several sections share, as they appear in the record: timestamps ([`TimeField`]),
//! identifiers (CX), person names (XPN), locations (PL), clinicians (XCN), coded values
//! (CE/CWE/CNE) and entity identifiers (EI), with the [`Reader`] methods that read them.

use serde::Serialize;

use crate::hl7::fields::{Rep, Seg};
use crate::hl7::time::TimeValue;
use crate::hl7::tri::Tri;

use super::reader::{FilterEmpty, Reader, composite};

/// A timestamp: parsed, or kept as sent and marked invalid.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum TimeField {
    /// Read by `crate::hl7::time::parse_dtm`.
    Parsed(TimeValue),
    /// Not a valid HL7 DTM/TS.
    Invalid(InvalidTime),
}

/// A timestamp that could not be read: `{"hl7": ..., "invalid": true}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InvalidTime {
    /// The HL7 text exactly as sent.
    pub hl7: String,
    /// Always true.
    pub invalid: bool,
}

/// An identifier (CX): PID-2/3/4, MRG-1/3/5, PV1-19.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Identifier {
    /// CX.1 identifier.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub value: Tri<String>,
    /// CX.5 identifier type code, e.g. `MR`, `NH`.
    #[serde(rename = "type", skip_serializing_if = "Tri::is_absent")]
    pub id_type: Tri<String>,
    /// CX.4.1 assigning authority namespace id, e.g. `NHS` or a trust code.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub authority: Tri<String>,
    /// CX.4.2 assigning authority universal id (e.g. an OID).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub authority_universal_id: Tri<String>,
    /// CX.4.3 universal id type (e.g. `ISO`).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub authority_universal_id_type: Tri<String>,
    /// `"PID-2"` or `"PID-4"` for identifiers not from PID-3; omitted otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<&'static str>,
}

/// A person name (XPN, or PN in v2.2).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Name {
    /// XPN.1.1 surname.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub family: Tri<String>,
    /// XPN.2 given name.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub given: Tri<String>,
    /// XPN.3 further given names or initials.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub middle: Tri<String>,
    /// XPN.4 suffix.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub suffix: Tri<String>,
    /// XPN.5 prefix, e.g. `MR`.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub prefix: Tri<String>,
    /// XPN.7 name type code, e.g. `L`.
    #[serde(rename = "type", skip_serializing_if = "Tri::is_absent")]
    pub name_type: Tri<String>,
}

/// A location (PL).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Location {
    /// PL.1 point of care (ward, clinic).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub point_of_care: Tri<String>,
    /// PL.2 room.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub room: Tri<String>,
    /// PL.3 bed.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub bed: Tri<String>,
    /// PL.4.1 facility.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub facility: Tri<String>,
}

/// A clinician (XCN, or CN in v2.2).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Provider {
    /// XCN.1 id (e.g. a GMC or local consultant code).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub id: Tri<String>,
    /// XCN.2.1 surname.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub family: Tri<String>,
    /// XCN.3 given name.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub given: Tri<String>,
    /// XCN.6 prefix, e.g. `DR`.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub prefix: Tri<String>,
}

/// A coded value (CE/CWE/CNE): the primary triplet, the alternate triplet
/// (components 4 to 6), the CWE/CNE coding system versions and original text.
/// A code sent only in the alternate components keeps it there, so `{}` never
/// stands for a code that was sent.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Coded {
    /// Identifier (component 1).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub code: Tri<String>,
    /// Text (component 2).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub text: Tri<String>,
    /// Name of coding system (component 3).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub system: Tri<String>,
    /// Alternate identifier (component 4), often a local code.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub alt_code: Tri<String>,
    /// Alternate text (component 5).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub alt_text: Tri<String>,
    /// Name of the alternate coding system (component 6).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub alt_system: Tri<String>,
    /// Coding system version id (CWE/CNE component 7).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub system_version: Tri<String>,
    /// Alternate coding system version id (CWE/CNE component 8).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub alt_system_version: Tri<String>,
    /// Original text (CWE/CNE component 9).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub original_text: Tri<String>,
}

/// An entity identifier (EI): placer, filler and group numbers.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EntityId {
    /// EI.1 entity identifier.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub value: Tri<String>,
    /// EI.2 namespace id.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub namespace: Tri<String>,
}

impl Reader<'_> {
    pub(super) fn identifier(&self, r: Rep<'_>, source: Option<&'static str>) -> Identifier {
        Identifier {
            value: self.comp(r, 1),
            id_type: self.comp(r, 5),
            authority: self.sub(r, 4, 1),
            authority_universal_id: self.sub(r, 4, 2),
            authority_universal_id_type: self.sub(r, 4, 3),
            source,
        }
    }

    pub(super) fn name(&self, r: Rep<'_>) -> Name {
        Name {
            family: self.sub(r, 1, 1),
            given: self.comp(r, 2),
            middle: self.comp(r, 3),
            suffix: self.comp(r, 4),
            prefix: self.comp(r, 5),
            name_type: self.comp(r, 7),
        }
    }

    pub(super) fn provider(&self, r: Rep<'_>) -> Provider {
        Provider {
            id: self.comp(r, 1),
            family: self.sub(r, 2, 1),
            given: self.comp(r, 3),
            prefix: self.comp(r, 6),
        }
    }

    pub(super) fn location(&self, r: Rep<'_>) -> Location {
        Location {
            point_of_care: self.comp(r, 1),
            room: self.comp(r, 2),
            bed: self.comp(r, 3),
            facility: self.sub(r, 4, 1),
        }
    }

    pub(super) fn coded(&self, r: Rep<'_>) -> Coded {
        Coded {
            code: self.comp(r, 1),
            text: self.comp(r, 2),
            system: self.comp(r, 3),
            alt_code: self.comp(r, 4),
            alt_text: self.comp(r, 5),
            alt_system: self.comp(r, 6),
            system_version: self.comp(r, 7),
            alt_system_version: self.comp(r, 8),
            original_text: self.comp(r, 9),
        }
    }

    /// Field `n` of `seg` (first repetition) as a coded value.
    pub(super) fn coded_field(&self, seg: Seg<'_, '_>, n: usize) -> Tri<Coded> {
        composite(seg.rep(n), |r| self.coded(r))
    }

    pub(super) fn entity(&self, r: Rep<'_>) -> EntityId {
        EntityId {
            value: self.comp(r, 1),
            namespace: self.comp(r, 2),
        }
    }

    /// An EI carried as subcomponents of component `c` (EIP, PRL).
    pub(super) fn entity_in(&self, r: Rep<'_>, c: usize) -> Tri<EntityId> {
        match Tri::from_hl7(r.comp(c)) {
            Tri::Absent => Tri::Absent,
            Tri::Null => Tri::Null,
            Tri::Value(_) => Tri::Value(EntityId {
                value: self.sub(r, c, 1),
                namespace: self.sub(r, c, 2),
            })
            .filter_empty(|e| e.value.is_absent() && e.namespace.is_absent()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{json_of, lines, opts};
    use serde_json::json;

    #[test]
    fn coded_values_keep_the_alternate_identifier_text_and_system() {
        let text = lines(&[
            "MSH|^~\\&|EPR|RXX|SR|HUB|20260601120000||ORM^O01|C1|P|2.5",
            "PID|1||RXX1^^^RXX^MR",
            "ORC|NW|P1",
            "OBR|1|P1||^^^^DNACPR",
            "ORC|NW|P2",
            "OBR|2|P2||^^^^IP CON FRAILTY",
            "OBX|1|ST|^^^ABC^Assign Benefits^PLW-HL7||x",
            "OBX|2|CWE|8310-5^Body temperature^LN^BT^Temp^L^2.70^1^Temperature taken||Y^Yes^HL70136",
        ]);
        let v = json_of(&text, &opts(false));
        assert_eq!(
            v["orders"][0]["universal_service"],
            json!({"alt_text": "DNACPR"})
        );
        assert_eq!(
            v["orders"][1]["universal_service"],
            json!({"alt_text": "IP CON FRAILTY"})
        );
        assert_eq!(
            v["observations"][0]["code"],
            json!({"alt_code": "ABC", "alt_text": "Assign Benefits", "alt_system": "PLW-HL7"})
        );
        assert_eq!(
            v["observations"][1]["code"],
            json!({
                "code": "8310-5", "text": "Body temperature", "system": "LN",
                "alt_code": "BT", "alt_text": "Temp", "alt_system": "L",
                "system_version": "2.70", "alt_system_version": "1",
                "original_text": "Temperature taken"
            })
        );
    }
}
