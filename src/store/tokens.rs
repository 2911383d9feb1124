//! Tenant API tokens, kept as hashes.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::FromRow;

use super::{Store, StoreError, events};

/// A token as listed to the admin: never the token itself.
#[derive(Debug, Clone, Serialize, FromRow, utoipa::ToSchema)]
pub struct TokenRecord {
    pub id: String,
    pub tenant: String,
    /// This token's limit on the tenant's live rentals (`null`: the configured default).
    pub max_rentals: Option<u32>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl Store {
    /// Records a token for `tenant` by its hash.
    pub async fn create_token(
        &self,
        tenant: &str,
        hash: &str,
        max_rentals: Option<u32>,
    ) -> Result<TokenRecord, StoreError> {
        let id = uuid::Uuid::new_v4().to_string();
        let mut tx = self.begin().await?;
        // Tenant columns compare without case, Rust with: the two agree only while no two
        // tenants' names differ only in case, so such a name is refused. The lock on the
        // matching index range serialises two lookalikes made at once.
        let lookalike: Option<(String,)> = sqlx::query_as(
            "SELECT tenant FROM tokens \
             WHERE tenant = ? AND CAST(tenant AS BINARY) <> CAST(? AS BINARY) \
             LIMIT 1 FOR UPDATE",
        )
        .bind(tenant)
        .bind(tenant)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((existing,)) = lookalike {
            return Err(StoreError::TenantLookalike(existing));
        }
        sqlx::query(
            "INSERT INTO tokens (id, tenant, max_rentals, token_hash, created_at) \
             VALUES (?, ?, ?, ?, UTC_TIMESTAMP(6))",
        )
        .bind(&id)
        .bind(tenant)
        .bind(max_rentals)
        .bind(hash)
        .execute(&mut *tx)
        .await?;
        events::append_in(
            &mut tx,
            "token.created",
            None,
            None,
            &format!("token {id} for tenant {tenant}"),
        )
        .await?;
        let record = sqlx::query_as(
            "SELECT id, tenant, max_rentals, created_at, revoked_at FROM tokens WHERE id = ?",
        )
        .bind(&id)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(record)
    }

    /// Revokes a token; false if there is no such live token.
    pub async fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE tokens SET revoked_at = UTC_TIMESTAMP(6) WHERE id = ? AND revoked_at IS NULL",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if done {
            events::append_in(
                &mut tx,
                "token.revoked",
                None,
                None,
                &format!("token {id} revoked"),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(done)
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT id, tenant, max_rentals, created_at, revoked_at FROM tokens \
                 ORDER BY created_at",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// The live token with this hash, and its tenant.
    pub async fn tenant_of_token(
        &self,
        hash: &str,
    ) -> Result<Option<crate::auth::TenantToken>, StoreError> {
        let row: Option<(String, String, Option<u32>)> = sqlx::query_as(
            "SELECT tenant, id, max_rentals FROM tokens \
             WHERE token_hash = ? AND revoked_at IS NULL",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(
            row.map(|(tenant, token_id, max_rentals)| crate::auth::TenantToken {
                tenant,
                token_id,
                max_rentals,
            }),
        )
    }
}
