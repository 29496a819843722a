"""webhook attempt outcome, webhook owner

Adds webhook_attempts.outcome (a coarse DeliveryOutcome: what a receiver's owner may see)
and webhooks.owner (the key whose secret signs the message; deliveries take turns between
owners). Existing rows are filled in, and the exception text that older versions stored in
webhook_attempts.error is replaced by the coarse text of its outcome.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

# Older versions wrote "<ExceptionName>: <message>" (or "HTTP <status>") into `error`.
_LEGACY_OUTCOME = """
    CASE
      WHEN http_status BETWEEN 200 AND 299 THEN 'HTTP_2XX'
      WHEN http_status BETWEEN 300 AND 399 THEN 'HTTP_3XX'
      WHEN http_status BETWEEN 400 AND 499 THEN 'HTTP_4XX'
      WHEN http_status BETWEEN 500 AND 599 THEN 'HTTP_5XX'
      WHEN http_status IS NOT NULL THEN 'PROTOCOL_ERROR'
      WHEN error LIKE '%Timeout%' THEN 'TIMEOUT'
      WHEN error LIKE '%refused%' THEN 'CONNECTION_REFUSED'
      WHEN error LIKE '%SSL%' OR error LIKE '%certificate%' THEN 'TLS_ERROR'
      WHEN error LIKE 'InvalidURL%' OR error LIKE 'UnsupportedProtocol%' THEN 'INVALID_URL'
      WHEN error LIKE '%ProtocolError%' THEN 'PROTOCOL_ERROR'
      ELSE 'CONNECTION_ERROR'
    END
"""

_COARSE_ERROR = """
    CASE
      WHEN outcome = 'HTTP_2XX' THEN NULL
      WHEN http_status IS NOT NULL THEN 'HTTP ' || CAST(http_status AS VARCHAR(8))
      WHEN outcome = 'TIMEOUT' THEN 'timed out'
      WHEN outcome = 'CONNECTION_REFUSED' THEN 'connection refused'
      WHEN outcome = 'TLS_ERROR' THEN 'TLS handshake or certificate verification failed'
      WHEN outcome = 'INVALID_URL' THEN 'the URL cannot be called'
      WHEN outcome = 'PROTOCOL_ERROR' THEN 'the answer was not valid HTTP'
      ELSE 'connection failed'
    END
"""


def upgrade() -> None:
    with op.batch_alter_table('webhook_attempts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('outcome', sqlmodel.sql.sqltypes.AutoString(length=24), nullable=True))
    with op.batch_alter_table('webhooks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('owner', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
    op.execute(f"UPDATE webhook_attempts SET outcome = {_LEGACY_OUTCOME}")
    op.execute(f"UPDATE webhook_attempts SET error = {_COARSE_ERROR}")
    op.execute("UPDATE webhooks SET owner = (SELECT jobs.owner FROM jobs WHERE jobs.id = webhooks.subject_id) "
               "WHERE subject_type = 'job'")
    op.execute("UPDATE webhooks SET owner = (SELECT batches.owner FROM batches WHERE batches.id = webhooks.subject_id) "
               "WHERE subject_type = 'batch'")


def downgrade() -> None:
    with op.batch_alter_table('webhooks', schema=None) as batch_op:
        batch_op.drop_column('owner')
    with op.batch_alter_table('webhook_attempts', schema=None) as batch_op:
        batch_op.drop_column('outcome')
