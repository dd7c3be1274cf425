//! What a caught panic said, for the error that reports it.

use std::any::Any;

/// The message of a panic's payload: `panic!`'s text (a `&str` or a `String`), else `otherwise`.
pub fn message(payload: &(dyn Any + Send), otherwise: &str) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|text| (*text).to_owned()))
        .unwrap_or_else(|| otherwise.to_owned())
}

#[cfg(test)]
mod tests {
    use std::panic::catch_unwind;

    use super::*;

    #[test]
    fn a_panics_text_is_its_message_whether_formatted_or_not() {
        let formatted = catch_unwind(|| panic!("index {} out of bounds", 3)).unwrap_err();
        assert_eq!(message(&*formatted, "a panic"), "index 3 out of bounds");
        let literal = catch_unwind(|| panic!("plain")).unwrap_err();
        assert_eq!(message(&*literal, "a panic"), "plain");
        let other = catch_unwind(|| std::panic::panic_any(7u8)).unwrap_err();
        assert_eq!(message(&*other, "a panic"), "a panic");
    }
}
