//! Stop strings over streamed text: text that could still become a stop string is held back.

/// Watches streamed text for any of a set of stop strings.
#[derive(Clone, Debug, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopStrings {
    /// Watches for `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        StopStrings {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Whether a stop string has been seen.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Feeds new text; returns the text that is safe to emit. After a stop string,
    /// returns the text before it and nothing ever again.
    pub fn push(&mut self, text: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.held.push_str(text);
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            let out = self.held[..pos].to_string();
            self.held.clear();
            return out;
        }
        // Hold back the longest tail that is a proper prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if self.held.ends_with(&s[..i]) {
                    keep = keep.max(i);
                }
            }
        }
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        out
    }

    /// Text held back at the end of generation (no stop string came).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_split_across_pushes() {
        let mut s = StopStrings::new(&["STOP".into(), "\n\n".into()]);
        assert_eq!(s.push("hello S"), "hello ");
        assert_eq!(s.push("T"), "");
        assert_eq!(s.push("OP and more"), "");
        assert!(s.stopped());
        assert_eq!(s.push("x"), "");
    }

    #[test]
    fn false_alarm_is_released() {
        let mut s = StopStrings::new(&["STOP".into()]);
        assert_eq!(s.push("ST"), "");
        assert_eq!(s.push("ay"), "STay");
        assert_eq!(s.push("ST"), "");
        assert_eq!(s.flush(), "ST");
        let mut s = StopStrings::new(&["é!".into()]);
        assert_eq!(s.push("caféé"), "café");
        assert_eq!(s.push("!"), "");
        assert!(s.stopped());
    }
}
