"""job queue columns and tables for the PostgreSQL JobQueue

What app/jobs/pg_queue.py needs to keep the queue in the database: on `jobs`, the fair-
queueing tag and arrival number (queue_tag, queue_seq), the prompt's token ids
(prompt_ids_json), whether the job holds a place of its owner's concurrency (queue_held),
and the claim's lease (claimed_by, leased_until); the tables queue_clock (the virtual
time per priority), queue_owner_tags (the last tag per priority and owner) and
queue_reservations (places reserved, each expiring). SQLite gets the same columns and
tables, unused; the sequence and the partial indexes are PostgreSQL's only.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('queue_tag', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('queue_seq', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('prompt_ids_json', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('queue_held', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column('claimed_by', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.add_column(sa.Column('leased_until', sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        'queue_clock',
        sa.Column('priority', sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column('vtime', sa.BigInteger(), nullable=False),
    )
    op.create_table(
        'queue_owner_tags',
        sa.Column('priority', sa.Integer(), nullable=False),
        sa.Column('owner', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),  # '' = no owner
        sa.Column('tag', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('priority', 'owner'),
    )
    op.create_table(
        'queue_reservations',
        sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=36), primary_key=True),
        sa.Column('owner', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column('n', sa.Integer(), nullable=False),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index('ix_queue_reservations_owner', 'queue_reservations', ['owner'])
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("CREATE SEQUENCE jobs_queue_seq")
        # The waiting jobs, in claim order; the claimed ones, by lease end; the held places.
        op.execute("CREATE INDEX ix_jobs_queue_waiting ON jobs (priority DESC, queue_tag, queue_seq) "
                   "WHERE status = 'QUEUED' AND queue_tag IS NOT NULL AND claimed_by IS NULL")
        op.execute("CREATE INDEX ix_jobs_queue_leases ON jobs (leased_until) WHERE claimed_by IS NOT NULL")
        op.execute("CREATE INDEX ix_jobs_queue_held ON jobs (owner) WHERE queue_held")


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("DROP INDEX IF EXISTS ix_jobs_queue_held")
        op.execute("DROP INDEX IF EXISTS ix_jobs_queue_leases")
        op.execute("DROP INDEX IF EXISTS ix_jobs_queue_waiting")
        op.execute("DROP SEQUENCE IF EXISTS jobs_queue_seq")
    op.drop_index('ix_queue_reservations_owner', table_name='queue_reservations')
    op.drop_table('queue_reservations')
    op.drop_table('queue_owner_tags')
    op.drop_table('queue_clock')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('leased_until')
        batch_op.drop_column('claimed_by')
        batch_op.drop_column('queue_held')
        batch_op.drop_column('prompt_ids_json')
        batch_op.drop_column('queue_seq')
        batch_op.drop_column('queue_tag')
