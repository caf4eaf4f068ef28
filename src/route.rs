//! Routing: which account type serves a request path (the longest configured prefix wins).
//! Swapped whole by a config reload.

use crate::upstream::AccountType;

/// Path prefix → account type; the longest prefix matching on a segment boundary wins.
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<(String, AccountType)>,
}

impl Router {
    pub fn new(routes: impl IntoIterator<Item = (String, AccountType)>) -> Router {
        let mut routes: Vec<_> = routes.into_iter().collect();
        routes.sort_by_key(|r| std::cmp::Reverse(r.0.len()));
        Router { routes }
    }

    pub fn route(&self, path: &str) -> Option<AccountType> {
        self.routes
            .iter()
            .find(|(p, _)| crate::path::has_prefix(path, p))
            .map(|(_, k)| *k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_longest_prefix() {
        let r = Router::new([
            ("/v1/".to_string(), AccountType::Openai),
            ("/v1/messages".to_string(), AccountType::Anthropic),
            ("/gemini/".to_string(), AccountType::Generic),
        ]);
        for (path, expected) in [
            ("/v1/chat/completions", Some(AccountType::Openai)),
            ("/v1/messages", Some(AccountType::Anthropic)),
            ("/v1/messages/count_tokens", Some(AccountType::Anthropic)),
            ("/gemini/v1beta/models", Some(AccountType::Generic)),
            ("/healthz", None),
        ] {
            assert_eq!(r.route(path), expected, "{path}");
        }
    }
}
