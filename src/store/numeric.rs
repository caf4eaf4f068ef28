//! `Decimal` bound as PostgreSQL `NUMERIC`, encoded straight into the wire format. A flush binds
//! a cost per usage row and two amounts per ledger row; sqlx's own encoding goes through a
//! `Vec` of base-10,000 digits made by one `u128` division per digit, which was the largest part
//! of binding a ledger row (benches/README.md, "Spend admission"). Here: at most one `u128`
//! division, the rest in `u64`, no allocation. The bytes are sqlx's (tested against it).

use rust_decimal::Decimal;
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgHasArrayType, PgTypeInfo};
use sqlx::{Encode, Postgres, Type};

/// A `Decimal` to bind as `NUMERIC` (alone or in an array).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Numeric(pub Decimal);

impl Type<Postgres> for Numeric {
    fn type_info() -> PgTypeInfo {
        <Decimal as Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <Decimal as Type<Postgres>>::compatible(ty)
    }
}

impl PgHasArrayType for Numeric {
    fn array_type_info() -> PgTypeInfo {
        <Decimal as PgHasArrayType>::array_type_info()
    }
}

impl Encode<'_, Postgres> for Numeric {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        write(self.0, buf);
        Ok(IsNull::No)
    }
}

/// `NUMERIC`'s binary form: the number of digits, the weight of the first (a power of
/// 10,000), the sign (`0x4000` negative), the display scale, each `i16` big-endian; then the
/// base-10,000 digits, most significant first, without trailing zero digits. Zero is no digits
/// and scale 0 (as sqlx writes it).
fn write(d: Decimal, out: &mut Vec<u8>) {
    if d.is_zero() {
        out.extend_from_slice(&[0; 8]);
        return;
    }
    let scale = d.scale(); // 0..=28
                           // Digits after the point come in whole groups of four: pad the mantissa to a multiple.
    let pad = (4 - scale % 4) % 4;
    let mut m = d.mantissa().unsigned_abs() * 10u128.pow(pad); // < 2^96 × 1000
                                                               // Least significant first; at most 8 digits (≤ 32 decimal digits).
    let mut rev = [0u16; 8];
    let mut n = 0;
    if m > u128::from(u64::MAX) {
        // The low 16 decimal digits first (four base-10,000 digits), by one u128 division.
        let mut low = (m % 10_000_000_000_000_000) as u64;
        m /= 10_000_000_000_000_000;
        for _ in 0..4 {
            rev[n] = (low % 10_000) as u16;
            low /= 10_000;
            n += 1;
        }
    }
    let mut rest = m as u64; // < 2^64 here: below it already, or < 2^106 / 10^16
    while rest != 0 {
        rev[n] = (rest % 10_000) as u16;
        rest /= 10_000;
        n += 1;
    }
    let after_point = (scale + pad) / 4;
    let weight = n as i16 - after_point as i16 - 1;
    let trailing = rev[..n].iter().take_while(|&&g| g == 0).count();
    let sign: u16 = if d.is_sign_negative() { 0x4000 } else { 0 };
    out.extend_from_slice(&((n - trailing) as i16).to_be_bytes());
    out.extend_from_slice(&weight.to_be_bytes());
    out.extend_from_slice(&sign.to_be_bytes());
    out.extend_from_slice(&(scale as u16).to_be_bytes());
    for g in rev[trailing..n].iter().rev() {
        out.extend_from_slice(&g.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::str::FromStr;

    /// The bytes sqlx writes for `d`, and ours.
    fn both(d: Decimal) -> (Vec<u8>, Vec<u8>) {
        let mut theirs = PgArgumentBuffer::default();
        let _ = Encode::<Postgres>::encode_by_ref(&d, &mut theirs).unwrap();
        let mut ours = PgArgumentBuffer::default();
        let _ = Encode::<Postgres>::encode_by_ref(&Numeric(d), &mut ours).unwrap();
        (theirs.to_vec(), ours.to_vec())
    }

    #[test]
    fn writes_what_sqlx_writes() {
        for s in [
            "0",
            "-0",
            "0.0000000000",
            "1",
            "-1",
            "10000",
            "9999",
            "0.0001",
            "0.0001234",
            "-0.015",
            "0.41",
            "123456789.123456789",
            "999999999.9999955000",
            "1000000000",
            "1e20",
            "18446744073709551615",
            "18446744073709551616",
            "0.0000000000000000000000000001",
            "79228162514264337593543950335",
            "-79228162514264337593543950335",
            "7.9228162514264337593543950335",
            "1.0000000000",
            "100000000.00000000",
        ] {
            let d = Decimal::from_str(s)
                .or_else(|_| Decimal::from_scientific(s))
                .unwrap();
            let (theirs, ours) = both(d);
            assert_eq!(ours, theirs, "{s}");
        }
    }

    proptest! {
        #[test]
        fn writes_what_sqlx_writes_for_any_decimal(
            lo: u32, mid: u32, hi: u32, negative: bool, scale in 0u32..=28,
        ) {
            let d = Decimal::from_parts(lo, mid, hi, negative, scale);
            let (theirs, ours) = both(d);
            prop_assert_eq!(ours, theirs, "{}", d);
        }

        #[test]
        fn writes_what_sqlx_writes_for_small_amounts(
            units in -10_000_000_000_000i64..10_000_000_000_000, scale in 0u32..=10,
        ) {
            let d = Decimal::new(units, scale);
            let (theirs, ours) = both(d);
            prop_assert_eq!(ours, theirs, "{}", d);
        }
    }
}
