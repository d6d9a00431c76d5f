//! The `patient`, `visit`, `event` and `merge` sections: PID (identifiers, the NHS number,
//! demographics when the feed allows them), PV1 and PV2, EVN, MRG. Which patient group a PID,
//! PV1, PV2 or MRG belongs to is decided by the segment loop in `mod.rs`.

use serde::Serialize;

use crate::hl7::fields::Seg;
use crate::hl7::nhs::nhs_number_valid;
use crate::hl7::time::LocalTime;
use crate::hl7::tri::Tri;

use super::NormaliseOptions;
use super::datatypes::{Identifier, Location, Name, Provider, TimeField};
use super::reader::{At, Reader, composite, is_null_raw, list};

/// The `patient` section (PID).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Patient {
    /// PID-3 repetitions, then PID-2 and PID-4 (marked with `source`).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub identifiers: Tri<Vec<Identifier>>,
    /// The first identifier whose authority is an NHS authority or whose type is `NH`.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub nhs_number: Tri<NhsNumber>,
    /// PID-5 repetitions (demographics only).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub names: Tri<Vec<Name>>,
    /// PID-7's calendar date exactly as sent, never converted to an instant or moved by a
    /// zone (demographics only); `hl7` keeps the whole PID-7.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub birth_date: Tri<TimeField>,
    /// PID-7's time of day when one was sent, as a local time with its precision
    /// (demographics only).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub birth_time: Tri<LocalTime>,
    /// PID-8 administrative sex.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub sex: Tri<String>,
    /// PID-29/PID-30, omitted when both are (demographics only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub death: Option<Death>,
    /// PID-11.5 of the first address (demographics only).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub postcode: Tri<String>,
    /// The first PID-11 repetition (demographics only).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub address: Tri<Address>,
}

/// The patient's NHS number, picked from the identifiers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NhsNumber {
    /// The identifier value as sent (escapes decoded).
    pub value: String,
    /// Ten digits, no spaces, Modulus 11 check digit right.
    pub valid: bool,
    /// PID-32 identity reliability / verification status (table 0445), e.g. `01`.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub verification_status: Tri<String>,
}

/// A postal address (XAD), first repetition of PID-11.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Address {
    /// XAD.1.1 street address.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub line1: Tri<String>,
    /// XAD.2 other designation (second line, locality).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub line2: Tri<String>,
    /// XAD.3 city.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub city: Tri<String>,
    /// XAD.4 state, province or county.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub county: Tri<String>,
    /// XAD.5 postcode.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub postcode: Tri<String>,
    /// XAD.6 country.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub country: Tri<String>,
    /// XAD.7 address type, e.g. `H`.
    #[serde(rename = "type", skip_serializing_if = "Tri::is_absent")]
    pub address_type: Tri<String>,
}

/// PID-29 and PID-30.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Death {
    /// PID-29 date/time of death.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub date_time: Tri<TimeField>,
    /// PID-30 death indicator (`Y`/`N`).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub indicator: Tri<String>,
}

/// The `visit` section (PV1, PV2).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Visit {
    /// PV1-2 patient class, e.g. `I`, `O`, `E`.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub class: Tri<String>,
    /// PV1-3 assigned location.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub location: Tri<Location>,
    /// PV1-6 prior location.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub prior_location: Tri<Location>,
    /// PV1-7 repetitions.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub attending: Tri<Vec<Provider>>,
    /// PV1-8 repetitions.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub referring: Tri<Vec<Provider>>,
    /// PV1-9 repetitions.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub consulting: Tri<Vec<Provider>>,
    /// PV1-10 hospital service (specialty).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub hospital_service: Tri<String>,
    /// PV1-14 admit source.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub admit_source: Tri<String>,
    /// PV1-19 visit number.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub visit_number: Tri<Identifier>,
    /// PV1-36 discharge disposition.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub discharge_disposition: Tri<String>,
    /// PV1-44 admit date/time.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub admitted_at: Tri<TimeField>,
    /// PV1-45 discharge date/time (first repetition).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub discharged_at: Tri<TimeField>,
    /// PV2-8 expected admit date/time.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub expected_admit_at: Tri<TimeField>,
}

/// The `event` section (EVN).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Event {
    /// EVN-1 event type code (older versions).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub type_code: Tri<String>,
    /// EVN-2 recorded date/time.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub recorded_at: Tri<TimeField>,
    /// EVN-3 planned date/time.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub planned_at: Tri<TimeField>,
    /// EVN-4 event reason code.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub reason: Tri<String>,
    /// EVN-5.1 operator id.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub operator: Tri<String>,
    /// EVN-6 event occurred.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub occurred_at: Tri<TimeField>,
}

/// The `merge` section (MRG).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Merge {
    /// MRG-1 repetitions.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub prior_identifiers: Tri<Vec<Identifier>>,
    /// MRG-3 prior patient account number.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub prior_account: Tri<Identifier>,
    /// MRG-5 prior visit number.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub prior_visit_number: Tri<Identifier>,
    /// MRG-7 repetitions (demographics only).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub prior_names: Tri<Vec<Name>>,
}

impl Reader<'_> {
    pub(super) fn patient(&mut self, seg: Seg<'_, '_>, at: At, opts: &NormaliseOptions) -> Patient {
        let mut ids = Vec::new();
        for (n, source) in [(3, None), (2, Some("PID-2")), (4, Some("PID-4"))] {
            if let Tri::Value(found) = list(seg.field(n), |r| self.identifier(r, source)) {
                ids.extend(found);
            }
        }
        let identifiers = if !ids.is_empty() {
            Tri::Value(ids)
        } else if seg.field(3).is_some_and(|f| is_null_raw(f.raw())) {
            Tri::Null
        } else {
            Tri::Absent
        };
        let nhs_number = self.nhs_number(&identifiers, seg, opts);
        let mut p = Patient {
            identifiers,
            nhs_number,
            sex: self.scalar(seg, 8),
            ..Patient::default()
        };
        if opts.demographics {
            p.names = list(seg.field(5), |r| self.name(r));
            (p.birth_date, p.birth_time) = self.birth(seg, 7, "PID", at);
            let death = Death {
                date_time: self.time(seg, 29, "PID", at),
                indicator: self.scalar(seg, 30),
            };
            if !(death.date_time.is_absent() && death.indicator.is_absent()) {
                p.death = Some(death);
            }
            let addr = seg.rep(11);
            p.address = composite(addr, |r| Address {
                line1: self.sub(r, 1, 1),
                line2: self.comp(r, 2),
                city: self.comp(r, 3),
                county: self.comp(r, 4),
                postcode: self.comp(r, 5),
                country: self.comp(r, 6),
                address_type: self.comp(r, 7),
            });
            p.postcode = match addr {
                Some(r) if is_null_raw(r.raw()) => Tri::Null,
                Some(r) => self.comp(r, 5),
                None => Tri::Absent,
            };
        }
        p
    }

    fn nhs_number(
        &self,
        ids: &Tri<Vec<Identifier>>,
        seg: Seg<'_, '_>,
        opts: &NormaliseOptions,
    ) -> Tri<NhsNumber> {
        let Tri::Value(ids) = ids else {
            return Tri::Absent;
        };
        let is_nhs = |id: &Identifier| {
            id.authority.value().is_some_and(|a| {
                opts.nhs_authorities
                    .iter()
                    .any(|n| n.eq_ignore_ascii_case(a))
            }) || id
                .id_type
                .value()
                .is_some_and(|t| t.eq_ignore_ascii_case("NH"))
        };
        let Some(id) = ids.iter().find(|id| is_nhs(id)) else {
            return Tri::Absent;
        };
        match &id.value {
            Tri::Absent => Tri::Absent,
            Tri::Null => Tri::Null,
            Tri::Value(v) => Tri::Value(NhsNumber {
                valid: nhs_number_valid(v),
                value: v.clone(),
                verification_status: self.scalar(seg, 32),
            }),
        }
    }

    pub(super) fn pv1(&mut self, v: &mut Visit, seg: Seg<'_, '_>, at: At) {
        v.class = self.scalar(seg, 2);
        v.location = composite(seg.rep(3), |r| self.location(r));
        v.prior_location = composite(seg.rep(6), |r| self.location(r));
        v.attending = list(seg.field(7), |r| self.provider(r));
        v.referring = list(seg.field(8), |r| self.provider(r));
        v.consulting = list(seg.field(9), |r| self.provider(r));
        v.hospital_service = self.scalar(seg, 10);
        v.admit_source = self.scalar(seg, 14);
        v.visit_number = composite(seg.rep(19), |r| self.identifier(r, None));
        v.discharge_disposition = self.scalar(seg, 36);
        v.admitted_at = self.time(seg, 44, "PV1", at);
        v.discharged_at = self.time(seg, 45, "PV1", at);
    }

    pub(super) fn event(&mut self, seg: Seg<'_, '_>, at: At) -> Event {
        Event {
            type_code: self.scalar(seg, 1),
            recorded_at: self.time(seg, 2, "EVN", at),
            planned_at: self.time(seg, 3, "EVN", at),
            reason: self.scalar(seg, 4),
            operator: self.scalar(seg, 5),
            occurred_at: self.time(seg, 6, "EVN", at),
        }
    }

    pub(super) fn merge(&self, seg: Seg<'_, '_>, opts: &NormaliseOptions) -> Merge {
        Merge {
            prior_identifiers: list(seg.field(1), |r| self.identifier(r, None)),
            prior_account: composite(seg.rep(3), |r| self.identifier(r, None)),
            prior_visit_number: composite(seg.rep(5), |r| self.identifier(r, None)),
            prior_names: if opts.demographics {
                list(seg.field(7), |r| self.name(r))
            } else {
                Tri::Absent
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{adt, json_of, lines, msg, opts};
    use serde_json::{Value, json};

    #[test]
    fn the_adt_message_normalises_every_section() {
        let v = json_of(&adt().text(), &opts(true));
        assert_eq!(
            v["segments"],
            json!(["MSH", "EVN", "PID", "PV1", "PV2", "OBX", "ZPD"])
        );
        assert_eq!(v.get("warnings"), None);
        let p = &v["patient"];
        assert_eq!(p["sex"], "F");
        assert_eq!(
            p["names"],
            json!([
                {"family": "TEST", "given": "PATIENT", "middle": "MIDDLE", "prefix": "MR", "type": "L"},
                {"family": "TEST", "given": "PAT", "type": "A"}
            ])
        );
        assert_eq!(p["birth_date"]["value"], "1980-06-15");
        assert_eq!(
            p["death"]["date_time"]["value"],
            "2026-01-01T12:00:00+00:00"
        );
        assert_eq!(p["death"]["indicator"], "Y");
        assert_eq!(p["postcode"], "ZZ99 9ZZ");
        assert_eq!(
            p["address"],
            json!({"line1": "1 TEST STREET", "line2": "FLAT 2", "city": "TESTTOWN",
                   "county": "TESTSHIRE", "postcode": "ZZ99 9ZZ", "country": "GBR", "type": "H"})
        );
        let vis = &v["visit"];
        assert_eq!(vis["class"], "I");
        assert_eq!(
            vis["location"],
            json!({"point_of_care": "WARD1", "room": "ROOM2", "bed": "BED3", "facility": "RXX"})
        );
        assert_eq!(
            vis["prior_location"],
            json!({"point_of_care": "WARD0", "facility": "RXX"})
        );
        assert_eq!(
            vis["attending"],
            json!([{"id": "C111", "family": "CONSULTANT", "given": "TEST", "prefix": "DR"}])
        );
        assert_eq!(vis["referring"][0]["id"], "G222");
        assert_eq!(vis.get("consulting"), None);
        assert_eq!(
            vis["hospital_service"], "A&E",
            "an unescaped & in a primitive survives"
        );
        assert_eq!(vis["admit_source"], "19");
        assert_eq!(
            vis["visit_number"],
            json!({"value": "V0001", "type": "VN", "authority": "RXX"})
        );
        assert_eq!(vis["discharge_disposition"], "01");
        assert_eq!(vis["admitted_at"]["value"], "2026-06-01T10:00:00+01:00");
        assert_eq!(vis["discharged_at"]["value"], "2026-06-05T11:00:00+01:00");
        assert_eq!(
            vis["expected_admit_at"]["value"],
            "2026-06-01T09:00:00+01:00"
        );
        let e = &v["event"];
        assert_eq!(e["type_code"], "A01");
        assert_eq!(e["recorded_at"]["value"], "2026-06-01T10:30:00+01:00");
        assert_eq!(e.get("planned_at"), None);
        assert_eq!(e["reason"], "ADM");
        assert_eq!(e["operator"], "OP123");
        assert_eq!(e["occurred_at"]["hl7"], "20260601102500");
        let obx = &v["observations"][0];
        assert_eq!(obx.get("order"), None, "an ADT OBX belongs to no order");
        assert_eq!(obx["value"], json!(172));
        assert_eq!(
            obx["units"],
            json!({"code": "cm", "text": "cm", "system": "UCUM"})
        );
        assert_eq!(v.get("orders"), None);
        assert_eq!(v.get("merge"), None);
    }

    #[test]
    fn a_birth_date_in_summer_time_stays_a_date() {
        let v = json_of(&adt().text(), &opts(true));
        assert_eq!(
            v["patient"]["birth_date"],
            json!({"value": "1980-06-15", "hl7": "19800615", "precision": "day"})
        );
    }

    #[test]
    fn unzoned_admit_times_take_the_right_offset_either_side_of_the_2026_clock_changes() {
        let table: &[(&str, &str, &str)] = &[
            (
                "before spring forward",
                "20260329003000",
                "2026-03-29T00:30:00+00:00",
            ),
            (
                "after spring forward",
                "20260329030000",
                "2026-03-29T03:00:00+01:00",
            ),
            (
                "the day before spring forward",
                "20260328120000",
                "2026-03-28T12:00:00+00:00",
            ),
            (
                "before fall back",
                "20261025003000",
                "2026-10-25T00:30:00+01:00",
            ),
            (
                "after fall back",
                "20261025030000",
                "2026-10-25T03:00:00+00:00",
            ),
            (
                "the day after fall back",
                "20261026120000",
                "2026-10-26T12:00:00+00:00",
            ),
        ];
        for (name, raw, expected) in table {
            let v = json_of(&adt().set("PV1", 44, raw).text(), &opts(false));
            let t = &v["visit"]["admitted_at"];
            assert_eq!(t["value"], *expected, "{name}");
            assert_eq!(t["zone"], "assumed", "{name}");
            assert_eq!(t["hl7"], *raw, "{name}");
            assert_eq!(t["precision"], "second", "{name}");
        }
        let v = json_of(
            &adt().set("PV1", 44, "202603290300+0000").text(),
            &opts(false),
        );
        assert_eq!(
            v["visit"]["admitted_at"]["value"],
            "2026-03-29T03:00:00+00:00"
        );
        assert_eq!(v["visit"]["admitted_at"]["zone"], "given");
    }

    #[test]
    fn identifiers_keep_authority_type_and_source_and_the_nhs_number_is_picked_out() {
        let v = json_of(&adt().text(), &opts(true));
        let p = &v["patient"];
        assert_eq!(
            p["identifiers"],
            json!([
                {"value": "9990000018", "type": "NH", "authority": "NHS"},
                {"value": "RXX0001", "type": "MR", "authority": "RXX",
                 "authority_universal_id": "2.16.840.1.113883.2.1.3.2.4.18.48",
                 "authority_universal_id_type": "ISO"},
                {"value": "OLD123", "type": "PI", "authority": "RXX", "source": "PID-2"}
            ])
        );
        assert_eq!(
            p["nhs_number"],
            json!({"value": "9990000018", "valid": true, "verification_status": "01"})
        );
    }

    #[test]
    fn the_nhs_number_is_found_by_authority_or_type_and_checked() {
        type Case = (&'static str, &'static str, &'static str, Option<Value>);
        let table: &[Case] = &[
            (
                "by NHS authority and NH type",
                "9990000018^^^NHS^NH",
                "",
                Some(json!({"value": "9990000018", "valid": true})),
            ),
            (
                "by NHSNBR authority alone",
                "9990000026^^^NHSNBR",
                "",
                Some(json!({"value": "9990000026", "valid": true})),
            ),
            (
                "authority ignores ASCII case",
                "9990000026^^^nhs",
                "",
                Some(json!({"value": "9990000026", "valid": true})),
            ),
            (
                "by NH type with another authority",
                "9990000050^^^RXX^NH",
                "",
                Some(json!({"value": "9990000050", "valid": true})),
            ),
            (
                "a wrong check digit is not valid",
                "9990000019^^^NHS^NH",
                "",
                Some(json!({"value": "9990000019", "valid": false})),
            ),
            (
                "a check digit of ten is not valid",
                "9990000000^^^NHS^NH",
                "",
                Some(json!({"value": "9990000000", "valid": false})),
            ),
            (
                "spaces are kept and not valid",
                "999 000 0018^^^NHS^NH",
                "",
                Some(json!({"value": "999 000 0018", "valid": false})),
            ),
            (
                "the first NHS identifier wins",
                "RXX1^^^RXX^MR~9990000026^^^NHS~9990000018^^^NHS",
                "",
                Some(json!({"value": "9990000026", "valid": true})),
            ),
            (
                "a cleared NHS number is null",
                "\"\"^^^NHS^NH",
                "",
                Some(Value::Null),
            ),
            (
                "no NHS identifier, no NHS number",
                "RXX1^^^RXX^MR",
                "",
                None,
            ),
            (
                "found in PID-2 of older versions",
                "RXX1^^^RXX^MR",
                "9990000018^^^NHS",
                Some(json!({"value": "9990000018", "valid": true})),
            ),
        ];
        for (name, pid3, pid2, expected) in table {
            let m = adt()
                .set("PID", 3, pid3)
                .set("PID", 2, pid2)
                .set("PID", 32, "");
            let v = json_of(&m.text(), &opts(false));
            assert_eq!(v["patient"].get("nhs_number").cloned(), *expected, "{name}");
        }
        let mut custom = opts(false);
        custom.nhs_authorities = vec!["2.16.840.1.113883.2.1.4.1".into()];
        let m = adt().set("PID", 3, "9990000018^^^2.16.840.1.113883.2.1.4.1^XX");
        let v = json_of(&m.text(), &custom);
        assert_eq!(
            v["patient"]["nhs_number"]["valid"], true,
            "configured authorities are used"
        );
    }

    #[test]
    fn pid_4_identifiers_are_marked_with_their_source() {
        let m = adt()
            .set("PID", 2, "")
            .set("PID", 4, "ALT1^^^RYY^PI~ALT2^^^RZZ");
        let v = json_of(&m.text(), &opts(false));
        let ids = v["patient"]["identifiers"].as_array().unwrap();
        assert_eq!(ids.len(), 4);
        assert_eq!(
            ids[2],
            json!({"value": "ALT1", "type": "PI", "authority": "RYY", "source": "PID-4"})
        );
        assert_eq!(
            ids[3],
            json!({"value": "ALT2", "authority": "RZZ", "source": "PID-4"})
        );
    }

    #[test]
    fn an_a40_merge_carries_both_new_and_prior_identifiers() {
        let m = msg(
            "MSH|^~\\&|PAS|RXX|SITERELAY|HUB|20260601103000||ADT^A40^ADT_A39|MSG0002|P|2.4",
            &[
                ("EVN", &[(1, "A40"), (2, "20260601100000")]),
                (
                    "PID",
                    &[
                        (1, "1"),
                        (3, "9990000018^^^NHS^NH~RXX0002^^^RXX^MR"),
                        (5, "TEST^PATIENT"),
                    ],
                ),
                (
                    "MRG",
                    &[
                        (1, "RXX0001^^^RXX^MR~OLD9^^^RYY^PI"),
                        (3, "ACC1^^^RXX^AN"),
                        (5, "V0009^^^RXX^VN"),
                        (7, "TEST^OLDNAME"),
                    ],
                ),
            ],
        );
        let v = json_of(&m.text(), &opts(true));
        assert_eq!(
            v["patient"]["identifiers"],
            json!([
                {"value": "9990000018", "type": "NH", "authority": "NHS"},
                {"value": "RXX0002", "type": "MR", "authority": "RXX"}
            ])
        );
        assert_eq!(
            v["merge"],
            json!({
                "prior_identifiers": [
                    {"value": "RXX0001", "type": "MR", "authority": "RXX"},
                    {"value": "OLD9", "type": "PI", "authority": "RYY"}
                ],
                "prior_account": {"value": "ACC1", "type": "AN", "authority": "RXX"},
                "prior_visit_number": {"value": "V0009", "type": "VN", "authority": "RXX"},
                "prior_names": [{"family": "TEST", "given": "OLDNAME"}]
            })
        );
        let minimal = json_of(&m.text(), &opts(false));
        assert_eq!(minimal["merge"].get("prior_names"), None);
        assert_eq!(
            minimal["merge"]["prior_identifiers"],
            v["merge"]["prior_identifiers"]
        );
    }

    #[test]
    fn without_demographics_names_dates_address_and_death_are_left_out() {
        let v = json_of(&adt().text(), &opts(false));
        let p = v["patient"].as_object().unwrap();
        let mut keys: Vec<&str> = p.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["identifiers", "nhs_number", "sex"]);
        let s = serde_json::to_string(&v).unwrap();
        for personal in ["PATIENT", "1980", "ZZ99", "TESTTOWN", "TEST STREET"] {
            assert!(!s.contains(personal), "{personal} leaked: {s}");
        }
        assert_eq!(v["visit"]["class"], "I", "visit content stays");
    }

    #[test]
    fn a_birth_date_sent_with_a_time_stays_the_date_sent_and_the_time_is_kept_apart() {
        let text = lines(&[
            "MSH|^~\\&|PAS|RXX|SR|HUB|20260601103000||ADT^A47^ADT_A30|BD1|P|2.4",
            "PID|1||RXX1^^^RXX^MR||TEST^ANN||199909090000|F",
        ]);
        let v = json_of(&text, &opts(true));
        assert_eq!(
            v["patient"]["birth_date"],
            json!({"value": "1999-09-09", "hl7": "199909090000", "precision": "day"})
        );
        assert_eq!(
            v["patient"]["birth_time"],
            json!({"value": "00:00", "precision": "minute"})
        );
        let no_time = lines(&[
            "MSH|^~\\&|PAS|RXX|SR|HUB|20260601103000||ADT^A08|BD2|P|2.4",
            "PID|1||RXX1^^^RXX^MR||TEST^ANN||19990909|F",
        ]);
        let v = json_of(&no_time, &opts(true));
        assert_eq!(v["patient"]["birth_date"]["value"], "1999-09-09");
        assert_eq!(v["patient"].get("birth_time"), None);
        let cleared = no_time.replace("19990909", "\"\"");
        let v = json_of(&cleared, &opts(true));
        assert_eq!(v["patient"]["birth_date"], Value::Null);
        assert_eq!(v["patient"]["birth_time"], Value::Null);
        let bad = no_time.replace("19990909", "19991309");
        let v = json_of(&bad, &opts(true));
        assert_eq!(
            v["patient"]["birth_date"],
            json!({"hl7": "19991309", "invalid": true})
        );
        assert_eq!(
            v["warnings"],
            json!(["PID-7 (segment 2): invalid timestamp kept as sent"])
        );
    }
}
